//! The only place that decides which LSN may be confirmed to PostgreSQL.
//!
//! # The rule
//!
//! The confirmed LSN is the `end_lsn` of the newest transaction `T` such that
//!
//! 1. `T`'s Commit message has been read from the slot, and
//! 2. every event of `T`, and every event of every transaction read before `T`, has been
//!    acknowledged by the broker (`acks=all`, so it is durable there).
//!
//! A keepalive read while no transaction is open counts as an empty transaction ending at
//! the keepalive's WAL position, so an idle outbox (WAL written only to other tables or
//! databases) never pins WAL on the server.
//!
//! # Why it is safe
//!
//! The walsender sends transactions in commit order, each completely, between a Begin
//! and a Commit. Confirming `end_lsn` of `T` tells PostgreSQL it may skip `T` and every
//! transaction that committed before it on restart; by (2) all their events are in the broker.
//! A transaction that committed later is still sent after a restart, because its commit
//! record lies beyond `end_lsn`; the slot's `restart_lsn`, kept by the server, lets it
//! rebuild such a transaction even if it started earlier. A logical walsender's
//! keepalive reports the position up to which it has decoded and sent everything, and
//! it arrives in stream order after that data, so when nothing is open or unacknowledged
//! every commit before it has been handled. Keepalives read inside a transaction are
//! ignored: mid-transaction the walsender may report a position before that commit.
//!
//! The confirmed LSN only moves forward; no other module computes one.

use std::collections::VecDeque;

use crate::lsn::Lsn;

/// Identifies one transaction read from the stream, in reading order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxnId(u64);

/// Tracks transactions from Begin until all their events are acknowledged.
#[derive(Debug)]
pub struct Progress {
    confirmed: Lsn,
    /// Oldest first. Holds transactions not yet confirmable; its length is bounded by
    /// the number of transactions with events in flight (empty ones are merged).
    pending: VecDeque<PendingTxn>,
    open: Option<TxnId>,
    next_id: u64,
    events_in_flight: u64,
}

#[derive(Debug)]
struct PendingTxn {
    id: TxnId,
    /// Commit time (Unix microseconds) of a real transaction; `None` for a keepalive mark.
    commit_time: Option<i64>,
    /// Known once the Commit has been read.
    end_lsn: Option<Lsn>,
    unacked: u64,
}

impl PendingTxn {
    fn is_done(&self) -> bool {
        self.end_lsn.is_some() && self.unacked == 0
    }
}

impl Progress {
    /// Starts from the slot's confirmed position.
    pub fn new(confirmed: Lsn) -> Self {
        Progress {
            confirmed,
            pending: VecDeque::new(),
            open: None,
            next_id: 0,
            events_in_flight: 0,
        }
    }

    /// The LSN that may be reported to PostgreSQL as flushed.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Events handed to the broker and not yet acknowledged.
    pub fn events_in_flight(&self) -> u64 {
        self.events_in_flight
    }

    /// The transaction being read, between its Begin and Commit.
    pub fn open_transaction(&self) -> Option<TxnId> {
        self.open
    }

    /// A Begin was read; `commit_time` is the transaction's commit time in Unix microseconds.
    pub fn begin(&mut self, commit_time: i64) -> TxnId {
        let id = TxnId(self.next_id);
        self.next_id += 1;
        self.open = Some(id);
        self.pending.push_back(PendingTxn {
            id,
            commit_time: Some(commit_time),
            end_lsn: None,
            unacked: 0,
        });
        id
    }

    /// Commit time (Unix microseconds) of the oldest transaction read but not confirmed.
    pub fn oldest_unconfirmed_commit_time(&self) -> Option<i64> {
        self.pending.iter().find_map(|entry| entry.commit_time)
    }

    /// An event of `txn` was handed to the broker.
    pub fn event_sent(&mut self, txn: TxnId) {
        if let Some(entry) = self.find(txn) {
            entry.unacked += 1;
            self.events_in_flight += 1;
        }
    }

    /// The Commit of `txn` was read. Returns the new confirmed LSN if it moved.
    pub fn commit(&mut self, txn: TxnId, end_lsn: Lsn) -> Option<Lsn> {
        if self.open == Some(txn) {
            self.open = None;
        }
        let entry = self.find(txn)?;
        entry.end_lsn = Some(end_lsn);
        self.merge_done_tail();
        self.advance()
    }

    /// The broker acknowledged one event of `txn`. Returns the new confirmed LSN if it
    /// moved. Acknowledgements of abandoned transactions are ignored.
    pub fn acked(&mut self, txn: TxnId) -> Option<Lsn> {
        let entry = self.find(txn)?;
        entry.unacked = entry.unacked.saturating_sub(1);
        self.events_in_flight = self.events_in_flight.saturating_sub(1);
        self.advance()
    }

    /// A keepalive reported that the server has sent everything before `wal_end`.
    /// Returns the new confirmed LSN if it moved.
    pub fn keepalive(&mut self, wal_end: Lsn) -> Option<Lsn> {
        if self.open.is_some() {
            return None;
        }
        match self.pending.back_mut() {
            Some(last) if last.is_done() => {
                last.end_lsn = last.end_lsn.max(Some(wal_end));
            }
            Some(_) => {
                let id = TxnId(self.next_id);
                self.next_id += 1;
                self.pending.push_back(PendingTxn {
                    id,
                    commit_time: None,
                    end_lsn: Some(wal_end),
                    unacked: 0,
                });
            }
            None => {
                if wal_end > self.confirmed {
                    self.confirmed = wal_end;
                    return Some(wal_end);
                }
            }
        }
        self.advance()
    }

    /// The stream was lost. The transaction being read will be sent again in full by
    /// the next session, so it is forgotten; so is everything not yet confirmable,
    /// which the next session, starting at [`confirmed`](Self::confirmed), sends again.
    pub fn restart_stream(&mut self) {
        self.open = None;
        self.pending.clear();
        self.events_in_flight = 0;
    }

    fn find(&mut self, txn: TxnId) -> Option<&mut PendingTxn> {
        let index = self.pending.binary_search_by_key(&txn, |entry| entry.id).ok()?;
        self.pending.get_mut(index)
    }

    /// Folds a finished last transaction into a finished one before it, so a run of
    /// empty transactions behind a slow one takes one entry, not one each.
    fn merge_done_tail(&mut self) {
        let len = self.pending.len();
        if len < 2 || !self.pending[len - 1].is_done() || !self.pending[len - 2].is_done() {
            return;
        }
        if let Some(last) = self.pending.pop_back() {
            if let Some(previous) = self.pending.back_mut() {
                previous.end_lsn = previous.end_lsn.max(last.end_lsn);
            }
        }
    }

    fn advance(&mut self) -> Option<Lsn> {
        let before = self.confirmed;
        while let Some(front) = self.pending.front() {
            match front.end_lsn {
                Some(end) if front.unacked == 0 => {
                    self.confirmed = self.confirmed.max(end);
                    self.pending.pop_front();
                }
                _ => break,
            }
        }
        (self.confirmed > before).then_some(self.confirmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transaction with one event handed to the broker, committed at `end`.
    fn committed_with_one_event(progress: &mut Progress, end: u64) -> TxnId {
        let txn = progress.begin(0);
        progress.event_sent(txn);
        progress.commit(txn, Lsn(end));
        txn
    }

    #[test]
    fn confirms_a_transaction_only_after_all_its_events_are_acked() {
        let mut progress = Progress::new(Lsn(10));
        let txn = progress.begin(0);
        progress.event_sent(txn);
        progress.event_sent(txn);
        assert_eq!(progress.commit(txn, Lsn(100)), None);
        assert_eq!(progress.acked(txn), None);
        assert_eq!(progress.confirmed(), Lsn(10));
        assert_eq!(progress.acked(txn), Some(Lsn(100)));
        assert_eq!(progress.events_in_flight(), 0);
    }

    #[test]
    fn never_passes_an_earlier_unacked_transaction() {
        let mut progress = Progress::new(Lsn(0));
        let first = committed_with_one_event(&mut progress, 100);
        let second = committed_with_one_event(&mut progress, 200);

        // The later transaction's ack arrives first: nothing may be confirmed yet.
        assert_eq!(progress.acked(second), None);
        assert_eq!(progress.confirmed(), Lsn(0));
        assert_eq!(progress.acked(first), Some(Lsn(200)));
    }

    #[test]
    fn acks_before_the_commit_is_read_do_not_confirm() {
        let mut progress = Progress::new(Lsn(0));
        let txn = progress.begin(0);
        progress.event_sent(txn);
        assert_eq!(progress.acked(txn), None);
        assert_eq!(progress.commit(txn, Lsn(50)), Some(Lsn(50)));
    }

    #[test]
    fn a_transaction_without_events_confirms_at_once_when_nothing_is_in_flight() {
        let mut progress = Progress::new(Lsn(0));
        let txn = progress.begin(0);
        assert_eq!(progress.commit(txn, Lsn(70)), Some(Lsn(70)));
    }

    #[test]
    fn keepalive_advances_an_idle_stream() {
        let mut progress = Progress::new(Lsn(5));
        assert_eq!(progress.keepalive(Lsn(900)), Some(Lsn(900)));
        assert_eq!(progress.keepalive(Lsn(800)), None, "never moves back");
        assert_eq!(progress.confirmed(), Lsn(900));
    }

    #[test]
    fn keepalive_inside_a_transaction_is_ignored() {
        let mut progress = Progress::new(Lsn(0));
        let txn = progress.begin(0);
        assert_eq!(progress.keepalive(Lsn(500)), None);
        assert_eq!(progress.commit(txn, Lsn(600)), Some(Lsn(600)));
    }

    #[test]
    fn keepalive_behind_unacked_events_waits_for_them() {
        let mut progress = Progress::new(Lsn(0));
        let txn = committed_with_one_event(&mut progress, 100);
        assert_eq!(progress.keepalive(Lsn(1000)), None);
        assert_eq!(progress.acked(txn), Some(Lsn(1000)));
    }

    #[test]
    fn empty_transactions_behind_a_slow_one_take_one_entry() {
        let mut progress = Progress::new(Lsn(0));
        let slow = committed_with_one_event(&mut progress, 10);
        for i in 0..10_000u64 {
            let empty = progress.begin(0);
            progress.commit(empty, Lsn(20 + i));
            progress.keepalive(Lsn(20 + i));
        }
        assert!(progress.pending.len() <= 2, "{} entries", progress.pending.len());
        assert_eq!(progress.acked(slow), Some(Lsn(20 + 9_999)));
    }

    #[test]
    fn restart_forgets_the_open_transaction_and_keeps_the_confirmed_lsn() {
        let mut progress = Progress::new(Lsn(0));
        let done = committed_with_one_event(&mut progress, 100);
        progress.acked(done);
        let torn = progress.begin(0);
        progress.event_sent(torn);
        progress.restart_stream();
        assert_eq!(progress.confirmed(), Lsn(100));
        assert_eq!(progress.open_transaction(), None);
        assert_eq!(progress.acked(torn), None, "ack of a forgotten transaction is ignored");
        assert_eq!(progress.events_in_flight(), 0);
    }

    proptest::proptest! {
        /// Whatever the order of acknowledgements, the confirmed LSN never passes a
        /// transaction with an unacknowledged event, and never moves back.
        #[test]
        fn confirmed_never_passes_an_unacked_event(
            sizes in proptest::collection::vec(0u64..4, 1..30),
            ack_order in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..200),
        ) {
            let mut progress = Progress::new(Lsn(0));
            let mut unacked: Vec<(TxnId, Lsn)> = Vec::new();
            for (i, &size) in sizes.iter().enumerate() {
                let txn = progress.begin(0);
                let end = Lsn(100 * (i as u64 + 1));
                for _ in 0..size {
                    progress.event_sent(txn);
                    unacked.push((txn, end));
                }
                progress.commit(txn, end);
            }
            let mut last = progress.confirmed();
            for index in ack_order {
                if unacked.is_empty() { break; }
                let (txn, _) = unacked.remove(index.index(unacked.len()));
                progress.acked(txn);
                let confirmed = progress.confirmed();
                proptest::prop_assert!(confirmed >= last);
                if let Some(earliest) = unacked.iter().map(|&(_, end)| end).min() {
                    proptest::prop_assert!(confirmed < earliest);
                }
                last = confirmed;
            }
        }
    }
}
