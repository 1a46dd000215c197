//! Reads a backfill's listed rows in batches and hands them to the relay loop as
//! transactions, the way the replication stream hands it WAL.
//!
//! Each batch is one transaction whose events keep their listed number as their index,
//! under one commit position just below the slot's start: every backfilled event sorts
//! before every streamed one, and the same row has the same position on every run, so the
//! exactly-once fence skips what an interrupted run already wrote. A transaction's end
//! position is its last row's number; what `progress` confirms is thus the number up to
//! which every row is published, which is written to the manifest as the backfill goes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::manifest::Manifest;
use crate::lsn::Lsn;
use crate::postgres::catalog::{self, PublishedTable};
use crate::postgres::connection::Database;
use crate::postgres::pgoutput::{Begin, Commit, Message};
use crate::postgres::stream::{StreamError, StreamEvent};
use crate::source::{Confirm, Source};

/// Rows read per query (and per transaction handed to the relay loop).
const BATCH: i64 = 2_000;

/// The listed rows of one backfill, as a [`Source`].
pub struct BackfillReader {
    events: mpsc::Receiver<Result<StreamEvent, StreamError>>,
    confirmed: Arc<AtomicU64>,
    gone: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl BackfillReader {
    /// Starts reading the rows numbered after `after` on `client` (which it keeps).
    /// `position` is the commit position every backfilled event carries.
    pub fn start(
        database: Database,
        client: Client,
        manifest: Manifest,
        table: PublishedTable,
        id_column: String,
        after: i64,
        position: Lsn,
    ) -> Self {
        let confirmed = Arc::new(AtomicU64::new(after.max(0) as u64));
        let gone = Arc::new(AtomicU64::default());
        // Two batches ahead at most: memory stays bounded by the window.
        let (sender, events) = mpsc::channel(2 * BATCH as usize);
        let reading = Reading {
            database,
            client,
            manifest,
            query: String::new(),
            table,
            id_column,
            position,
            confirmed: Arc::clone(&confirmed),
            gone: Arc::clone(&gone),
            sender,
        };
        let task = tokio::spawn(reading.run(after));
        BackfillReader {
            events,
            confirmed,
            gone,
            task,
        }
    }

    /// Listed rows no longer in the table when their batch was read.
    pub fn rows_gone(&self) -> u64 {
        self.gone.load(Ordering::Relaxed)
    }

    /// The number up to which every listed row is confirmed published.
    pub fn confirmed(&self) -> i64 {
        self.confirmed.load(Ordering::Relaxed) as i64
    }
}

impl Drop for BackfillReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Confirm for BackfillReader {
    fn confirm(&self, lsn: Lsn) {
        self.confirmed.fetch_max(lsn.0, Ordering::Relaxed);
    }
}

impl Source for BackfillReader {
    async fn next(&mut self) -> Result<Option<StreamEvent>, StreamError> {
        self.events.recv().await.transpose()
    }
}

struct Reading {
    database: Database,
    client: Client,
    manifest: Manifest,
    query: String,
    table: PublishedTable,
    id_column: String,
    position: Lsn,
    confirmed: Arc<AtomicU64>,
    gone: Arc<AtomicU64>,
    sender: mpsc::Sender<Result<StreamEvent, StreamError>>,
}

impl Reading {
    async fn run(mut self, after: i64) {
        if let Err(error) = self.read(after).await {
            let _ = self.sender.send(Err(error)).await;
        }
    }

    async fn read(&mut self, mut after: i64) -> Result<(), StreamError> {
        let database = self.database.clone();
        let failed = |e: tokio_postgres::Error| {
            StreamError::from_connect(database.connect_error(&e), "reading the rows to backfill")
        };
        catalog::use_server_formats(&self.client).await.map_err(failed)?;
        self.query = self.manifest.batch_query(&self.table, &self.id_column);
        let statement = self.client.prepare(&self.query).await.map_err(failed)?;
        if !self
            .send(StreamEvent::Message(Message::Relation(self.table.relation())))
            .await
        {
            return Ok(());
        }
        loop {
            let rows = self.client.query(&statement, &[&after, &BATCH]).await.map_err(failed)?;
            let Some(last) = rows.last().map(|row| row.get::<_, i64>(0)) else {
                return Ok(());
            };
            // The list is numbered without gaps: a missing number is a deleted row.
            let missing = (last - after) as u64 - rows.len() as u64;
            self.gone.fetch_add(missing, Ordering::Relaxed);
            let commit_time = crate::clock::now_micros() - crate::clock::POSTGRES_EPOCH_MICROS;
            let begin = Begin {
                final_lsn: self.position,
                commit_time,
                xid: 0,
            };
            if !self.send(StreamEvent::Message(Message::Begin(begin))).await {
                return Ok(());
            }
            for row in &rows {
                let ordinal: i64 = row.get(0);
                let index = u32::try_from(ordinal).map_err(|_| {
                    StreamError::fatal(format!("row number {ordinal} of the backfill is beyond 4294967295"))
                })?;
                let insert = catalog::insert_from_row(&self.table, row, 1);
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
            // Between batches, write down how far publishing is confirmed.
            let confirmed = self.confirmed.load(Ordering::Relaxed) as i64;
            self.manifest
                .done_through(&self.client, confirmed)
                .await
                .map_err(failed)?;
        }
    }

    /// Hands on one event; `false` once the relay loop is gone.
    async fn send(&self, event: StreamEvent) -> bool {
        self.sender.send(Ok(event)).await.is_ok()
    }
}
