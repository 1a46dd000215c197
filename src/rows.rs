//! Rows read with SQL, handed to the relay loop as transactions, the way the replication
//! stream hands it WAL: a backfill's listed rows and a replay's selected rows.
//!
//! Each batch is one transaction whose events keep their number (from 1, in the order the
//! rows are read) as their index, under one commit position chosen by the caller: for a
//! backfill, just below the slot's start, so that every backfilled event sorts before every
//! streamed one and the same row has the same position on every run (the exactly-once fence
//! then skips what an interrupted run already wrote). A transaction's end position is its
//! last row's number, so what `progress` confirms is the number up to which every row is
//! published.

use std::future::Future;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_postgres::{Client, Row};

use crate::app::RelaySettings;
use crate::error::RelayError;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::outbox::Role;
use crate::postgres::catalog::{self, PublishedTable};
use crate::postgres::pgoutput::{Begin, Commit, Message};
use crate::postgres::stream::{StreamError, StreamEvent};
use crate::source::{Confirm, Source};

/// Rows per batch (and per transaction handed to the relay loop).
pub const BATCH: i64 = 2_000;

/// Where a reader's rows come from.
pub trait Batches: Send + Sync + 'static {
    /// The next rows after number `after`, as `(number, row)`: the table's columns as
    /// text ([`PublishedTable::text_select_list`]) start at column `first_column()`.
    /// Empty when there are no more.
    fn next_batch(&mut self, after: i64) -> impl Future<Output = Result<Vec<(i64, Row)>, StreamError>> + Send;

    fn first_column(&self) -> usize;

    /// Called between batches with the number up to which every row is confirmed.
    fn confirmed(&mut self, through: i64) -> impl Future<Output = Result<(), StreamError>> + Send;
}

/// Counters a reader keeps for its report.
#[derive(Debug, Default)]
pub struct Counts {
    confirmed: AtomicU64,
    gone: AtomicU64,
}

impl Counts {
    /// The number up to which every row is confirmed published.
    pub fn confirmed(&self) -> i64 {
        self.confirmed.load(Ordering::Relaxed) as i64
    }

    /// Numbered rows missing when their batch was read (deleted meanwhile).
    pub fn gone(&self) -> u64 {
        self.gone.load(Ordering::Relaxed)
    }
}

/// A [`Source`] of rows read by SQL.
pub struct RowReader {
    events: mpsc::Receiver<Result<StreamEvent, StreamError>>,
    counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl RowReader {
    /// Starts reading the rows numbered after `after`; every event carries commit position
    /// `position`.
    pub fn start<B: Batches>(batches: B, table: PublishedTable, after: i64, position: Lsn) -> Self {
        let counts = Arc::new(Counts::default());
        counts.confirmed.store(after.max(0) as u64, Ordering::Relaxed);
        // Two batches ahead at most: memory stays bounded by the window.
        let (sender, events) = mpsc::channel(2 * BATCH as usize);
        let reading = Reading {
            batches,
            table,
            position,
            counts: Arc::clone(&counts),
            sender,
        };
        let task = tokio::spawn(reading.run(after));
        RowReader { events, counts, task }
    }

    pub fn counts(&self) -> Arc<Counts> {
        Arc::clone(&self.counts)
    }
}

impl Drop for RowReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Confirm for RowReader {
    fn confirm(&self, lsn: Lsn) {
        self.counts.confirmed.fetch_max(lsn.0, Ordering::Relaxed);
    }
}

impl Source for RowReader {
    async fn next(&mut self) -> Result<Option<StreamEvent>, StreamError> {
        self.events.recv().await.transpose()
    }
}

struct Reading<B> {
    batches: B,
    table: PublishedTable,
    position: Lsn,
    counts: Arc<Counts>,
    sender: mpsc::Sender<Result<StreamEvent, StreamError>>,
}

impl<B: Batches> Reading<B> {
    async fn run(mut self, after: i64) {
        if let Err(error) = self.read(after).await {
            let _ = self.sender.send(Err(error)).await;
        }
    }

    async fn read(&mut self, mut after: i64) -> Result<(), StreamError> {
        if !self
            .send(StreamEvent::Message(Message::Relation(self.table.relation())))
            .await
        {
            return Ok(());
        }
        let first = self.batches.first_column();
        loop {
            let rows = self.batches.next_batch(after).await?;
            let Some(last) = rows.last().map(|(number, _)| *number) else {
                return Ok(());
            };
            // Numbers have no gaps: a missing one is a deleted row.
            let missing = (last - after).max(0) as u64;
            self.counts
                .gone
                .fetch_add(missing.saturating_sub(rows.len() as u64), Ordering::Relaxed);
            let commit_time = crate::clock::now_micros() - crate::clock::POSTGRES_EPOCH_MICROS;
            let begin = Begin {
                final_lsn: self.position,
                commit_time,
                xid: 0,
            };
            if !self.send(StreamEvent::Message(Message::Begin(begin))).await {
                return Ok(());
            }
            for (number, row) in &rows {
                let index = u32::try_from(*number)
                    .map_err(|_| StreamError::fatal(format!("row number {number} is beyond 4294967295")))?;
                let insert = catalog::insert_from_row(&self.table, row, first);
                if !self.send(StreamEvent::Row { insert, index }).await {
                    return Ok(());
                }
            }
            let commit = Commit {
                flags: 0,
                commit_lsn: self.position,
                end_lsn: Lsn(last as u64),
                commit_time,
            };
            if !self.send(StreamEvent::Message(Message::Commit(commit))).await {
                return Ok(());
            }
            after = last;
            self.batches.confirmed(self.counts.confirmed()).await?;
        }
    }

    /// Hands on one event; `false` once the relay loop is gone.
    async fn send(&self, event: StreamEvent) -> bool {
        self.sender.send(Ok(event)).await.is_ok()
    }
}

/// Shows how far a backfill or replay (`what`) is: a line rewritten every second on a
/// terminal, a log line every 10 seconds otherwise. Runs until aborted.
pub async fn show_progress(metrics: Arc<Metrics>, total: i64, what: &'static str) {
    let terminal = std::io::stderr().is_terminal();
    let every = if terminal {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(10)
    };
    let started = Instant::now();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let _newline = NewlineOnDrop(terminal);
    loop {
        ticks.tick().await;
        let done = metrics.events_published.get()
            + metrics.events_skipped_already_written.get()
            + metrics.events_dead_lettered.get();
        let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
        let percent = if total > 0 {
            done as f64 * 100.0 / total as f64
        } else {
            100.0
        };
        if terminal {
            eprint!("\r{what}: {done} of {total} rows ({percent:.0}%), {rate:.0} rows/s   ");
        } else {
            tracing::info!(done, total, rows_per_second = rate as u64, "{what} progress");
        }
    }
}

/// Ends the progress line when the display stops.
struct NewlineOnDrop(bool);

impl Drop for NewlineOnDrop {
    fn drop(&mut self) {
        if self.0 {
            eprintln!();
        }
    }
}

/// What a backfill or replay reads: the publication's one table, its id and order columns.
pub struct Plan {
    pub table: PublishedTable,
    pub id_column: String,
    pub order_column: String,
}

impl Plan {
    /// Checks the table and the mapping before anything is read; `unique_id` when rows
    /// must be found again by id (a backfill's list).
    pub async fn read(
        settings: &RelaySettings,
        order_column: Option<&str>,
        client: &Client,
        unique_id: bool,
    ) -> Result<Plan, RelayError> {
        let sql_error = |e: tokio_postgres::Error| RelayError::Connect(settings.database.connect_error(&e));
        let mut tables = catalog::publication_tables(client, &settings.publication)
            .await
            .map_err(sql_error)?;
        if tables.len() != 1 {
            let names: Vec<String> = tables.iter().map(PublishedTable::display).collect();
            return Err(RelayError::Backfill(format!(
            "publication {} has {} tables ({}); a backfill or replay reads exactly one: give the outbox table a publication of its own",
            settings.publication,
            tables.len(),
            names.join(", ")
        )));
        }
        let table = tables.remove(0);
        settings
            .columns
            .validate(&table.display(), &table.columns, &settings.template)
            .map_err(|problem| RelayError::Config(format!("mapping: {problem}")))?;
        let id_column = settings.columns.column(Role::Id).map(str::to_owned).ok_or_else(|| {
        RelayError::Backfill(
            "the mapping has no id column (--column id=); backfills and replays find rows by id: map the table's unique column with --column id=COLUMN".to_owned(),
        )
    })?;
        let unique: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                             WHERE i.indrelid = $1 AND i.indisunique AND i.indnkeyatts = 1 AND i.indpred IS NULL
                               AND a.attname = $2)",
            &[&table.oid, &id_column],
        )
        .await
        .map_err(sql_error)?
        .get(0);
        if unique_id && !unique {
            return Err(RelayError::Backfill(format!(
            "column {id_column:?} of {} (the id) has no unique index; a backfill finds its rows again by id: add one (CREATE UNIQUE INDEX ON {} ({}))",
            table.display(),
            table.qualified(),
            catalog::quote_identifier(&id_column)
        )));
        }
        let order_column = order_column.map_or_else(|| id_column.clone(), str::to_owned);
        if table.column(&order_column).is_none() {
            return Err(RelayError::Config(format!(
                "order column: table {} has no column {order_column:?}",
                table.display()
            )));
        }
        Ok(Plan {
            table,
            id_column,
            order_column,
        })
    }
}
