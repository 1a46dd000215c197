//! Between the session loop and the sink: hands mapped events to the broker, dead-letters
//! what can never be published (or halts), and reports, as [`Note`]s, what the session
//! loop must tell `progress`.
//!
//! Why notes rather than calls into `progress`: the sink may wait (a full queue, a topic
//! being read) and outcomes arrive meanwhile. Keeping them as notes, applied by the loop
//! in order right after each call, leaves one place that moves the confirmed position
//! and never lets an event's outcome overtake its submission.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::config::OnPoison;
use crate::dead_letter::DeadLetter;
use crate::error::{ErrorClass, RelayError};
use crate::metrics::Metrics;
use crate::outbox::OutboxEvent;
use crate::progress::TxnId;
use crate::readiness::Health;
use crate::sink::{Acked, AnySink, Failure, Sink, Submitted, Tag, TxnRef};

/// What the session loop tells `progress`, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// A record of the transaction was handed to the broker.
    Sent(TxnId),
    /// A record of the transaction is acknowledged (or its dead letter is in flight).
    Done(TxnId),
}

/// Where dead letters go and whether they go at all.
#[derive(Debug, Clone)]
pub struct PoisonPolicy {
    pub on_poison: OnPoison,
    pub dead_letter_topic: String,
    /// The `outbox.source` of dead letters: database and slot.
    pub source: String,
}

pub struct Publisher {
    sink: AnySink,
    policy: PoisonPolicy,
    /// Records the broker refused for good after they were sent, waiting to be
    /// dead-lettered (or to halt the relay).
    poisoned: VecDeque<(Tag, Failure)>,
    notes: VecDeque<Note>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl Publisher {
    pub fn new(sink: AnySink, policy: PoisonPolicy, metrics: Arc<Metrics>, health: Arc<Health>) -> Self {
        Publisher {
            sink,
            policy,
            poisoned: VecDeque::new(),
            notes: VecDeque::new(),
            metrics,
            health,
        }
    }

    /// Records handed to the broker and not yet settled.
    pub fn in_flight(&self) -> usize {
        self.sink.in_flight()
    }

    pub fn is_idle(&self) -> bool {
        self.sink.in_flight() == 0
    }

    pub fn has_poisoned(&self) -> bool {
        !self.poisoned.is_empty()
    }

    /// After an outage the next session reads those events again.
    pub fn forget_poisoned(&mut self) {
        self.poisoned.clear();
    }

    /// What happened since the last call, oldest first.
    pub fn notes(&mut self) -> std::collections::vec_deque::Drain<'_, Note> {
        self.notes.drain(..)
    }

    /// Publishes a mapped event, or dead-letters what could not be mapped.
    pub async fn publish(&mut self, mapped: Result<OutboxEvent, DeadLetter>, txn: TxnRef) -> Result<(), RelayError> {
        match mapped {
            Ok(event) => self.publish_event(event, txn).await,
            Err(letter) => {
                tracing::warn!(reason = %letter.reason, "outbox event cannot be published");
                self.dead_letter(letter, txn).await
            }
        }
    }

    async fn publish_event(&mut self, event: OutboxEvent, txn: TxnRef) -> Result<(), RelayError> {
        match self.submit(&event, txn, false).await? {
            Submitted::Queued => Ok(()),
            Submitted::AlreadyWritten => {
                self.metrics.events_skipped_already_written.inc();
                Ok(())
            }
            Submitted::Refused(refusal) if refusal.class == ErrorClass::Fatal => {
                Err(DeadLetter::from_event(&event, refusal.class, refusal.reason).into_halt_error())
            }
            Submitted::Refused(refusal) => {
                let mut letter = DeadLetter::from_event(&event, refusal.class, refusal.reason);
                if refusal.too_large {
                    letter = letter.without_payload();
                }
                self.dead_letter(letter, txn).await
            }
        }
    }

    async fn submit(&mut self, event: &OutboxEvent, txn: TxnRef, dead_letter: bool) -> Result<Submitted, RelayError> {
        let tag = Tag {
            txn,
            id: event.id.clone(),
            position: event.position,
            dead_letter,
            payload_bytes: event.payload.as_ref().map_or(0, bytes::Bytes::len) as u64,
        };
        let submitted = self.sink.submit(event, tag).await?;
        if matches!(submitted, Submitted::Queued) {
            self.notes.push_back(Note::Sent(txn.id));
            self.metrics.events_in_flight.set(self.sink.in_flight() as i64);
        }
        Ok(submitted)
    }

    /// Sends an event that can never be published to the dead-letter destination, or stops
    /// the relay (`--on-poison halt`, or when the dead-letter destination refuses it too).
    async fn dead_letter(&mut self, letter: DeadLetter, txn: TxnRef) -> Result<(), RelayError> {
        if self.policy.on_poison == OnPoison::Halt {
            return Err(letter.into_halt_error());
        }
        tracing::warn!(id = letter.id.as_deref().unwrap_or(""), commit_lsn = %letter.position.commit_lsn, index = letter.position.index, reason = %letter.reason, topic = %self.policy.dead_letter_topic, "dead-lettering event");
        let event = letter
            .clone()
            .into_event(&self.policy.dead_letter_topic, &self.policy.source);
        match self.submit(&event, txn, true).await? {
            Submitted::Queued => {
                self.metrics.events_dead_lettered.inc();
                Ok(())
            }
            Submitted::AlreadyWritten => Ok(()),
            Submitted::Refused(refusal) => Err(dead_letter_refused(letter, &refusal.reason)),
        }
    }

    /// The next outcome from the broker; `None` when nothing is in flight. Cancel-safe.
    pub async fn next_ack(&mut self) -> Option<Acked> {
        self.sink.next_ack().await
    }

    /// Accounts for one outcome. A record refused for good is queued for
    /// [`handle_poisoned`](Self::handle_poisoned); its transaction stays unconfirmed.
    pub fn settle(&mut self, ack: Acked) -> Result<(), RelayError> {
        let tag = ack.tag;
        self.metrics.events_in_flight.set(self.sink.in_flight() as i64);
        if let Err(failure) = &ack.result {
            self.metrics.error(failure.refusal.class.as_str());
        }
        match ack.result {
            Ok(()) => {
                self.health.acked();
                if !tag.dead_letter {
                    self.metrics.events_published.inc();
                    self.metrics.bytes_published.inc_by(tag.payload_bytes);
                    let age = crate::clock::now_micros().saturating_sub(tag.txn.commit_time);
                    self.metrics.commit_to_ack_seconds.observe(age.max(0) as f64 / 1e6);
                }
                self.notes.push_back(Note::Done(tag.txn.id));
                Ok(())
            }
            Err(failure) if failure.refusal.class == ErrorClass::Transient => Err(RelayError::Broker {
                context: format!(
                    "delivery of outbox event id={} at commit LSN {} (index {}) failed",
                    tag.id, tag.position.commit_lsn, tag.position.index
                ),
                class: ErrorClass::Transient,
                source: failure.refusal.reason.into(),
            }),
            Err(failure) if failure.refusal.class == ErrorClass::Fatal || tag.dead_letter => {
                let reason = failure.refusal.reason;
                let letter =
                    DeadLetter::from_returned(None, &tag.id, tag.position, failure.refusal.class, reason.clone());
                if tag.dead_letter {
                    Err(dead_letter_refused(letter, &reason))
                } else {
                    Err(letter.into_halt_error())
                }
            }
            Err(failure) => {
                self.poisoned.push_back((tag, failure));
                Ok(())
            }
        }
    }

    /// Dead-letters records the broker refused after they were sent, then counts the
    /// original as done, so that its transaction waits for the dead letter's outcome.
    pub async fn handle_poisoned(&mut self) -> Result<(), RelayError> {
        while let Some((tag, failure)) = self.poisoned.pop_front() {
            let refusal = failure.refusal;
            let mut letter =
                DeadLetter::from_returned(failure.returned, &tag.id, tag.position, refusal.class, refusal.reason);
            if refusal.too_large {
                letter = letter.without_payload();
            }
            self.dead_letter(letter, tag.txn).await?;
            self.notes.push_back(Note::Done(tag.txn.id));
        }
        Ok(())
    }
}

fn dead_letter_refused(letter: DeadLetter, reason: &str) -> RelayError {
    let mut error = letter.into_halt_error();
    if let RelayError::Delivery { reason: text, .. } = &mut error {
        *text = format!("{text}; the dead-letter destination refused it too: {reason}");
    }
    error
}
