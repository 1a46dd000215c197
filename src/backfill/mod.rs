//! `outbox-relay setup --backfill WHERE`: creates the slot and publishes the rows that
//! existed when it was created, so that a relay can take over from a poller at any moment
//! with nothing lost or doubled (docs/adr/0010).
//!
//! The slot is created on a replication session that exports its snapshot; a transaction
//! that imports that snapshot lists the matching rows (the manifest), so the list holds
//! exactly the rows committed before the slot's first streamed change. The list is then
//! published through the relay loop (`app::publish_source`) with `run`'s mapping, fence and
//! delivery rules, under positions below the slot's start; `run` refuses to stream until
//! the backfill is finished, so backfilled events reach every partition before streamed ones.

pub mod manifest;

use std::sync::Arc;
use std::time::Instant;

use tokio_postgres::Client;

use crate::app::{RelaySettings, SourceOutcome};
use crate::config::SetupArgs;
use crate::error::RelayError;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::postgres::catalog::{self, PublishedTable};
use crate::postgres::connection::Database;
use crate::postgres::slot;
use crate::postgres::stream::{ReplicationStream, StreamError};
use crate::rows::{Batches, Plan, RowReader, BATCH};
use crate::shutdown::Shutdown;
use manifest::{Manifest, Record, State};

/// Runs `setup --backfill`: prepares (or resumes) the backfill and publishes it. Returns
/// the lines of setup's report.
pub async fn backfill(
    args: &SetupArgs,
    condition: &str,
    database: &Database,
    mut client: Client,
    server: usize,
    shutdown: Shutdown,
) -> Result<Vec<String>, RelayError> {
    let settings = RelaySettings::for_publishing(&args.postgres, &args.publish)?;
    let sql_error = |e: tokio_postgres::Error| RelayError::Connect(database.connect_error(&e));
    let plan = plan(&settings, args, condition, &client).await?;
    let manifest = Manifest::new(&plan.table, &settings.slot);
    let mut report = Vec::new();

    let slot_name = settings.slot.clone();
    let slot_name = &slot_name;
    let existing = slot::inspect(&client, slot_name).await.map_err(sql_error)?;
    let record = manifest.read(&client).await.map_err(sql_error)?;
    let record = match (existing, record) {
        (Some(_), Some(record)) if record.state == State::Finished => {
            report.push(format!(
                "backfill of slot {slot_name} finished earlier ({} rows where {}); nothing to do: `outbox-relay run` streams from the slot",
                record.rows, record.condition
            ));
            return Ok(report);
        }
        (Some(info), Some(record)) if record.state == State::Ready => {
            slot::check(Some(info), slot_name, database.dbname())?;
            if record.condition != condition || record.table != plan.table.display() {
                return Err(RelayError::Backfill(format!(
                    "slot {slot_name} has an unfinished backfill of {} where {}; run setup with that --backfill to finish it (or drop the slot and the table {} to start another)",
                    record.table,
                    record.condition,
                    manifest.list_table()
                )));
            }
            report.push(format!(
                "resuming the backfill of slot {slot_name}: {} of {} rows confirmed earlier",
                record.done_through, record.rows
            ));
            record
        }
        (Some(info), Some(_)) => {
            // Pending: the slot was made by this backfill, which stopped before it listed
            // the rows; nothing was published from it and `run` refuses it. Start over.
            slot::check(Some(info), slot_name, database.dbname())?;
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[slot_name])
                .await
                .map_err(sql_error)?;
            report.push(format!(
                "dropped slot {slot_name}, left by a backfill interrupted before it listed its rows; starting over"
            ));
            let (record, line) = create(args, &plan, condition, &manifest, database, &mut client, server).await?;
            report.push(line);
            record
        }
        (Some(info), None) => {
            return Err(RelayError::Backfill(format!(
                "slot {slot_name} already exists (confirmed up to {}) and was not created by a backfill. A backfill must create its own slot: the rows it publishes are exactly those the slot will not stream, which only holds for a slot created in the same step. Stream this slot with `outbox-relay run`, or choose another --slot, or drop this one (pg_drop_replication_slot) if nothing streams from it",
                info.confirmed_flush_lsn.unwrap_or_default()
            )));
        }
        (None, _) => {
            let (record, line) = create(args, &plan, condition, &manifest, database, &mut client, server).await?;
            report.push(line);
            record
        }
    };

    let start = record.start_lsn.ok_or_else(|| {
        RelayError::Backfill(format!("the backfill record of slot {slot_name} has no start position"))
    })?;
    let listed = ListedRows::new(database, server, manifest.clone(), &plan).await?;
    let mut reader = RowReader::start(
        listed,
        plan.table.clone(),
        record.done_through,
        // Below the slot's start: every backfilled event sorts before every streamed one.
        Lsn(start.0.saturating_sub(1)),
    );
    let counts = reader.counts();
    let metrics = Metrics::new(settings.sink.kind());
    let display = tokio::spawn(crate::rows::show_progress(
        Arc::clone(&metrics),
        record.rows - record.done_through,
        "backfill",
    ));
    let started = Instant::now();
    let outcome = crate::app::publish_source(
        settings,
        &mut reader,
        Lsn(record.done_through.max(0) as u64),
        Arc::clone(&metrics),
        shutdown,
    )
    .await;
    display.abort();
    let _ = display.await;
    drop(reader);
    let confirmed = counts.confirmed();
    let gone = counts.gone();
    let took = started.elapsed();
    let summary = format!(
        "{} published, {} already written by an earlier run, {} dead-lettered, {} deleted before they were read; {:.1} s",
        metrics.events_published.get(),
        metrics.events_skipped_already_written.get(),
        metrics.events_dead_lettered.get(),
        gone,
        took.as_secs_f64()
    );
    match outcome {
        Ok(SourceOutcome::Finished) => {
            manifest.finish(&mut client, confirmed).await.map_err(sql_error)?;
            report.push(format!(
                "backfilled {} rows where {}: {summary}",
                record.rows, condition
            ));
            report.push(format!(
                "slot {slot_name} is ready: `outbox-relay run` streams everything committed since {start}"
            ));
            Ok(report)
        }
        outcome => {
            // Keep what was confirmed, so that the next run starts there.
            let saved = manifest.done_through(&client, confirmed).await;
            for line in &report {
                tracing::info!("{line}");
            }
            if let Err(error) = saved {
                tracing::warn!(error = %database.connect_error(&error), "could not record how far the backfill got; the next run skips what was written all the same");
            }
            match outcome {
                Err(error) => Err(error),
                Ok(_) => Err(RelayError::Interrupted(format!(
                    "backfill interrupted with {confirmed} of {} rows confirmed ({summary}); run the same command again to resume",
                    record.rows
                ))),
            }
        }
    }
}

/// The manifest's listed rows, joined with the table, in batches.
struct ListedRows {
    database: Database,
    client: Client,
    manifest: Manifest,
    statement: tokio_postgres::Statement,
}

impl ListedRows {
    async fn new(database: &Database, server: usize, manifest: Manifest, plan: &Plan) -> Result<Self, RelayError> {
        let client = database.connect_server(server).await?;
        let sql_error = |e: tokio_postgres::Error| RelayError::Connect(database.connect_error(&e));
        catalog::use_server_formats(&client).await.map_err(sql_error)?;
        let statement = client
            .prepare(&manifest.batch_query(&plan.table, &plan.id_column))
            .await
            .map_err(sql_error)?;
        Ok(ListedRows {
            database: database.clone(),
            client,
            manifest,
            statement,
        })
    }

    fn failed(&self, error: &tokio_postgres::Error) -> StreamError {
        StreamError::from_connect(self.database.connect_error(error), "reading the rows to backfill")
    }
}

impl Batches for ListedRows {
    async fn next_batch(&mut self, after: i64) -> Result<Vec<(i64, tokio_postgres::Row)>, StreamError> {
        let rows = self
            .client
            .query(&self.statement, &[&after, &BATCH])
            .await
            .map_err(|e| self.failed(&e))?;
        Ok(rows.into_iter().map(|row| (row.get(0), row)).collect())
    }

    fn first_column(&self) -> usize {
        1
    }

    /// Writes down how far publishing is confirmed, for the next run to start there.
    async fn confirmed(&mut self, through: i64) -> Result<(), StreamError> {
        self.manifest
            .done_through(&self.client, through)
            .await
            .map_err(|e| self.failed(&e))
    }
}

/// Why `run` must not stream from `slot` yet: a backfill of it (of `table`) is not
/// finished, and streamed events would overtake backfilled ones.
pub async fn unfinished(
    client: &Client,
    table: &PublishedTable,
    slot: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    let record = Manifest::new(table, slot).read(client).await?;
    Ok(record.filter(|record| record.state != State::Finished).map(|record| {
        format!(
            "slot {slot} has an unfinished backfill ({} of {} rows of {} confirmed); finish it with `outbox-relay setup --backfill {:?}` (the same command resumes it) before streaming, so that no streamed event overtakes a backfilled one",
            record.done_through, record.rows, record.table, record.condition
        )
    }))
}

/// Checks what the backfill reads before anything is created.
async fn plan(
    settings: &RelaySettings,
    args: &SetupArgs,
    condition: &str,
    client: &Client,
) -> Result<Plan, RelayError> {
    let plan = Plan::read(settings, args.backfill_order.as_deref(), client, true).await?;
    // Refuse a condition PostgreSQL cannot plan before a slot exists.
    let explain = format!("EXPLAIN SELECT 1 FROM {} t WHERE ({condition})", plan.table.qualified());
    if let Err(error) = client.query(&explain, &[]).await {
        let error = settings.database.connect_error(&error);
        return Err(RelayError::Config(format!(
            "--backfill {condition:?} is not a valid condition on {}: {}",
            plan.table.display(),
            error.message
        )));
    }
    Ok(plan)
}

/// Creates the slot with an exported snapshot and lists the rows that snapshot sees.
/// Returns the backfill's record and a line for the report.
async fn create(
    args: &SetupArgs,
    plan: &Plan,
    condition: &str,
    manifest: &Manifest,
    database: &Database,
    client: &mut Client,
    server: usize,
) -> Result<(Record, String), RelayError> {
    let sql_error = |e: tokio_postgres::Error| RelayError::Connect(database.connect_error(&e));
    let slot_name = &args.postgres.slot;
    let major = slot::server_major(client).await.map_err(sql_error)?;
    manifest
        .begin(client, &plan.table, &plan.id_column, condition)
        .await
        .map_err(|e| {
            let error = database.connect_error(&e);
            RelayError::Backfill(format!(
                "cannot create the backfill's tables in schema {} ({}); the role running setup needs CREATE there",
                plan.table.schema, error.message
            ))
        })?;
    let failover = args.failover_slot && major >= slot::FAILOVER_SLOTS_SINCE;
    let exported = ReplicationStream::create_slot_with_snapshot(database, server, slot_name, failover, major).await?;
    let listed = manifest
        .list(
            client,
            &exported.snapshot,
            exported.consistent_point,
            &plan.table,
            &plan.id_column,
            &plan.order_column,
            condition,
        )
        .await
        .map_err(sql_error)?;
    let start = exported.consistent_point;
    drop(exported);
    let line = format!(
        "created slot {slot_name} (pgoutput{}) at {start}; {listed} rows of {} where {condition} existed then",
        if failover { ", failover-enabled" } else { "" },
        plan.table.display(),
    );
    let record = Record {
        state: State::Ready,
        table: plan.table.display(),
        condition: condition.to_owned(),
        start_lsn: Some(start),
        rows: listed,
        done_through: 0,
    };
    Ok((record, line))
}
