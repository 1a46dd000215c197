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
pub mod reader;

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::app::{RelaySettings, SourceOutcome};
use crate::config::SetupArgs;
use crate::error::RelayError;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::outbox::Role;
use crate::postgres::catalog::{self, PublishedTable};
use crate::postgres::connection::Database;
use crate::postgres::slot;
use crate::postgres::stream::ReplicationStream;
use crate::shutdown::Shutdown;
use manifest::{Manifest, Record, State};
use reader::BackfillReader;

/// What a backfill reads: the table, its id and order columns, and the condition.
struct Plan {
    table: PublishedTable,
    id_column: String,
    order_column: String,
    condition: String,
}

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

    let slot_name = &settings.slot.clone();
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
            if record.condition != plan.condition || record.table != plan.table.display() {
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
            create(args, &plan, &manifest, database, &mut client, server, &mut report).await?
        }
        (Some(info), None) => {
            return Err(RelayError::Backfill(format!(
                "slot {slot_name} already exists (confirmed up to {}) and was not created by a backfill. A backfill must create its own slot: the rows it publishes are exactly those the slot will not stream, which only holds for a slot created in the same step. Stream this slot with `outbox-relay run`, or choose another --slot, or drop this one (pg_drop_replication_slot) if nothing streams from it",
                info.confirmed_flush_lsn.unwrap_or_default()
            )));
        }
        (None, _) => create(args, &plan, &manifest, database, &mut client, server, &mut report).await?,
    };

    let start = record.start_lsn.ok_or_else(|| {
        RelayError::Backfill(format!("the backfill record of slot {slot_name} has no start position"))
    })?;
    let reading_client = database.connect_server(server).await?;
    let mut reader = BackfillReader::start(
        database.clone(),
        reading_client,
        manifest.clone(),
        plan.table.clone(),
        plan.id_column.clone(),
        record.done_through,
        // Below the slot's start: every backfilled event sorts before every streamed one.
        Lsn(start.0.saturating_sub(1)),
    );
    let metrics = Metrics::new();
    let display = tokio::spawn(show_progress(Arc::clone(&metrics), record.rows - record.done_through));
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
    let confirmed = reader.confirmed();
    let gone = reader.rows_gone();
    drop(reader);
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
                record.rows, plan.condition
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
    let sql_error = |e: tokio_postgres::Error| RelayError::Connect(settings.database.connect_error(&e));
    let mut tables = catalog::publication_tables(client, &settings.publication)
        .await
        .map_err(sql_error)?;
    if tables.len() != 1 {
        let names: Vec<String> = tables.iter().map(PublishedTable::display).collect();
        return Err(RelayError::Backfill(format!(
            "publication {} has {} tables ({}); a backfill reads exactly one: give the outbox table a publication of its own",
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
            "the mapping has no id column (--column id=); a backfill finds its rows again by id: map the table's unique column with --column id=COLUMN".to_owned(),
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
    if !unique {
        return Err(RelayError::Backfill(format!(
            "column {id_column:?} of {} (the id) has no unique index; a backfill finds its rows again by id: add one (CREATE UNIQUE INDEX ON {} ({}))",
            table.display(),
            table.qualified(),
            catalog::quote_identifier(&id_column)
        )));
    }
    let order_column = args.backfill_order.clone().unwrap_or_else(|| id_column.clone());
    if table.column(&order_column).is_none() {
        return Err(RelayError::Config(format!(
            "--backfill-order: table {} has no column {order_column:?}",
            table.display()
        )));
    }
    // Refuse a condition PostgreSQL cannot plan before a slot exists.
    let explain = format!("EXPLAIN SELECT 1 FROM {} t WHERE ({condition})", table.qualified());
    if let Err(error) = client.query(&explain, &[]).await {
        let error = settings.database.connect_error(&error);
        return Err(RelayError::Config(format!(
            "--backfill {condition:?} is not a valid condition on {}: {}",
            table.display(),
            error.message
        )));
    }
    Ok(Plan {
        table,
        id_column,
        order_column,
        condition: condition.to_owned(),
    })
}

/// Creates the slot with an exported snapshot and lists the rows that snapshot sees.
async fn create(
    args: &SetupArgs,
    plan: &Plan,
    manifest: &Manifest,
    database: &Database,
    client: &mut Client,
    server: usize,
    report: &mut Vec<String>,
) -> Result<Record, RelayError> {
    let sql_error = |e: tokio_postgres::Error| RelayError::Connect(database.connect_error(&e));
    let slot_name = &args.postgres.slot;
    let major = slot::server_major(client).await.map_err(sql_error)?;
    manifest
        .begin(client, &plan.table, &plan.id_column, &plan.condition)
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
            &plan.condition,
        )
        .await
        .map_err(sql_error)?;
    let start = exported.consistent_point;
    drop(exported);
    report.push(format!(
        "created slot {slot_name} (pgoutput{}) at {start}; {listed} rows of {} where {} existed then",
        if failover { ", failover-enabled" } else { "" },
        plan.table.display(),
        plan.condition
    ));
    manifest
        .read(client)
        .await
        .map_err(sql_error)?
        .ok_or_else(|| RelayError::Backfill("the backfill record vanished".into()))
}

/// Shows how far the backfill is: a line rewritten every second on a terminal, a log
/// line every 10 seconds otherwise.
async fn show_progress(metrics: Arc<Metrics>, total: i64) {
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
            eprint!("\rbackfill: {done} of {total} rows ({percent:.0}%), {rate:.0} rows/s   ");
        } else {
            tracing::info!(done, total, rows_per_second = rate as u64, "backfill progress");
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
