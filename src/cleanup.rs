//! Outbox cleanup (`--retention`): deletes outbox rows once their events are confirmed
//! and the rows are older than the retention.
//!
//! # Knowing a row is published without a column for it
//!
//! A row does not carry the LSN of its commit, and the relay cannot remember the id of
//! every event it published (that would grow with the retention). Instead the cleaner
//! takes a *mark* every interval, in two steps on an ordinary connection:
//!
//! 1. `xmin`: the oldest transaction id still running (`pg_snapshot_xmin` of a fresh
//!    snapshot). Every transaction with an older id has ended.
//! 2. `lsn`: the WAL insert position, read after (1).
//!
//! A transaction writes its commit record before it stops counting as running, so every
//! transaction older than `xmin` that committed did so below `lsn`. Once the relay's
//! confirmed LSN reaches `lsn`, every row whose inserting transaction (`xmin` system
//! column) is older than the mark's `xmin` has had its event acknowledged by the broker.
//! A mark taken at time `t` covers only transactions that ended before `t`, so a mark
//! at least `retention` old deletes only rows at least that old.
//!
//! The rule errs one way only: a row of a transaction still running at the mark (a
//! long transaction, or a subtransaction id newer than the mark) waits for a later mark.
//! A frozen row reads as the oldest possible transaction, which it is.
//!
//! # Without blocking writers
//!
//! Deletes go in batches of [`BATCH`] rows, each its own short statement, located by
//! `ctid`; inserts never wait for them. Marks live in memory, one per interval, so after
//! a restart cleanup resumes once a new mark is old enough.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::periodic::{Flow, Periodic};
use crate::postgres::connection::Database;
use crate::shutdown::Shutdown;

/// Rows deleted per statement.
pub const BATCH: i64 = 1_000;

/// A point before which every ended transaction is below a known LSN.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mark {
    /// Oldest transaction id running when the mark was taken (32-bit, as text).
    xmin: String,
    /// WAL insert position read after `xmin`.
    lsn: Lsn,
    taken: Instant,
}

/// The marks taken and not yet used, oldest first.
#[derive(Debug, Default)]
struct Marks {
    queue: VecDeque<Mark>,
}

impl Marks {
    fn push(&mut self, mark: Mark) {
        self.queue.push_back(mark);
    }

    /// The newest mark that is at least `retention` old and whose LSN is confirmed.
    /// Older marks are dropped: the returned one covers everything they covered.
    fn usable(&mut self, confirmed: Lsn, retention: Duration, now: Instant) -> Option<Mark> {
        let ready = |mark: &Mark| mark.lsn <= confirmed && now.duration_since(mark.taken) >= retention;
        let count = self.queue.iter().take_while(|mark| ready(mark)).count();
        let mut used = self.queue.drain(..count);
        used.next_back()
    }

    fn len(&self) -> usize {
        self.queue.len()
    }
}

/// How often a mark is taken: a tenth of the retention, between 1 s and 1 min, so a
/// row outlives its retention by at most that and the marks kept stay few.
pub fn mark_interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Deletes published rows from the publication's tables.
pub struct Cleaner {
    pub database: Database,
    pub publication: String,
    pub retention: Duration,
    /// The relay's confirmed LSN.
    pub confirmed: watch::Receiver<Lsn>,
    pub metrics: Arc<Metrics>,
}

impl Cleaner {
    /// Marks and deletes until shutdown. Database errors are logged and retried on the
    /// next tick; a missing privilege stops cleanup alone, never the relay.
    pub async fn run(self, shutdown: Shutdown) {
        let period = mark_interval(self.retention);
        let database = self.database.clone();
        let mut task = Cleaning {
            cleaner: self,
            marks: Marks::default(),
        };
        crate::periodic::run(database, "cleanup", period, &mut task, shutdown).await;
    }

    /// Takes a mark, then deletes what the newest usable mark covers.
    async fn pass(
        &self,
        client: &tokio_postgres::Client,
        marks: &mut Marks,
        shutdown: &mut Shutdown,
    ) -> Result<(), tokio_postgres::Error> {
        marks.push(take_mark(client).await?);
        self.metrics.cleanup_passes.inc();
        let confirmed = *self.confirmed.borrow();
        let Some(mark) = marks.usable(confirmed, self.retention, Instant::now()) else {
            return Ok(());
        };
        let tables = publication_tables(client, &self.publication).await?;
        let mut deleted = 0u64;
        for table in &tables {
            loop {
                let rows = delete_batch(client, table, &mark.xmin).await?;
                self.metrics.rows_cleaned.inc_by(rows);
                deleted += rows;
                if rows < BATCH as u64 || shutdown.is_triggered() {
                    break;
                }
            }
        }
        tracing::debug!(deleted, mark_lsn = %mark.lsn, marks_kept = marks.len(), "cleanup pass");
        Ok(())
    }
}

/// The cleaner and the marks it holds between ticks.
struct Cleaning {
    cleaner: Cleaner,
    marks: Marks,
}

impl Periodic for Cleaning {
    async fn tick(
        &mut self,
        client: &tokio_postgres::Client,
        shutdown: &mut Shutdown,
    ) -> Result<Flow, tokio_postgres::Error> {
        match self.cleaner.pass(client, &mut self.marks, shutdown).await {
            Ok(()) => Ok(Flow::Continue),
            Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
                tracing::error!(
                    error = %self.cleaner.database.connect_error(&error),
                    "cleanup disabled: the relay's role needs DELETE on the outbox tables (see sql/003_relay_role.sql)"
                );
                Ok(Flow::Stop)
            }
            Err(error) => Err(error),
        }
    }
}

async fn take_mark(client: &tokio_postgres::Client) -> Result<Mark, tokio_postgres::Error> {
    // Two statements, in this order: the LSN must be read after the snapshot.
    let xmin: String = client
        .query_one("SELECT xid(pg_snapshot_xmin(pg_current_snapshot()))::text", &[])
        .await?
        .get(0);
    let lsn: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    Ok(Mark {
        xmin,
        lsn: lsn.parse().unwrap_or(Lsn::MAX),
        taken: Instant::now(),
    })
}

/// The publication's tables, quoted for use in SQL.
async fn publication_tables(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Deletes up to [`BATCH`] rows inserted by transactions older than `xmin`.
///
/// `age()` counts back from the same reference for both sides within one statement, so
/// `age(xmin) > age(mark)` means "inserted by an older transaction", wraparound included.
async fn delete_batch(client: &tokio_postgres::Client, table: &str, xmin: &str) -> Result<u64, tokio_postgres::Error> {
    let sql = format!(
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM {table} WHERE age(xmin) > age($1::text::xid) LIMIT {BATCH}))"
    );
    client.execute(&sql, &[&xmin]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(lsn: u64, age_secs: u64, now: Instant) -> Mark {
        Mark {
            xmin: lsn.to_string(),
            lsn: Lsn(lsn),
            taken: now - Duration::from_secs(age_secs),
        }
    }

    #[test]
    fn the_newest_confirmed_and_old_enough_mark_is_used() {
        let now = Instant::now();
        let mut marks = Marks::default();
        for (lsn, age) in [(10, 30), (20, 20), (30, 10), (40, 0)] {
            marks.push(mark(lsn, age, now));
        }
        // Not confirmed far enough: nothing, even though old enough.
        assert_eq!(marks.usable(Lsn(5), Duration::from_secs(15), now), None);
        // Confirmed past all, but only the first two are 15 s old.
        assert_eq!(
            marks.usable(Lsn(100), Duration::from_secs(15), now),
            Some(mark(20, 20, now))
        );
        assert_eq!(marks.len(), 2);
        // Old enough, but the confirmed LSN stops at the first remaining mark.
        assert_eq!(marks.usable(Lsn(35), Duration::ZERO, now), Some(mark(30, 10, now)));
        assert_eq!(marks.len(), 1);
    }

    #[test]
    fn marks_stay_few() {
        assert_eq!(mark_interval(Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(mark_interval(Duration::from_secs(300)), Duration::from_secs(30));
        assert_eq!(
            mark_interval(Duration::from_secs(7 * 24 * 3600)),
            Duration::from_secs(60)
        );
    }
}
