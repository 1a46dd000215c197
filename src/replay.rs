//! `outbox-relay replay`: publishes again rows still in the outbox table, to their own
//! topics or to `--topic-template`, each marked with an `outbox.replay` header naming the run.
//!
//! It reads the table with SQL in one read-only snapshot, never the slot, and publishes
//! through the relay loop (at least once: a replay is a deliberate repetition, so the
//! exactly-once fence is off, and replayed records carry no source position that the
//! relay's own fence could mistake for one of its records).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use crate::app::{RelaySettings, SourceOutcome};
use crate::config::{Delivery, ReplayArgs};
use crate::error::RelayError;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::outbox::{Mapper, SourcePosition};
use crate::postgres::catalog::{self, quote_identifier};
use crate::postgres::connection::Database;
use crate::postgres::stream::StreamError;
use crate::rows::{Batches, Plan, RowReader, BATCH};
use crate::shutdown::Shutdown;

/// The rows a replay selects: the SQL condition and its parameters.
struct Selection {
    condition: String,
    parameters: Vec<Box<dyn ToSql + Sync + Send>>,
    /// How the selection reads in messages.
    description: String,
}

impl Selection {
    fn parameters(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.parameters
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// Runs `replay`; returns the lines of its report.
pub async fn replay(args: &ReplayArgs, shutdown: Shutdown) -> Result<Vec<String>, RelayError> {
    let run = args.run_name.clone().unwrap_or_else(|| {
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        format!("replay-{now}")
    });
    let mut settings = RelaySettings::for_publishing(&args.postgres, &args.publish)?;
    settings.delivery = Delivery::AtLeastOnce;
    settings.replay_run = Some(run.clone());
    let database = settings.database.clone();
    let connected = database.open().await?;
    let client = connected.client;
    let plan = Plan::read(&settings, args.order_by.as_deref(), &client, false).await?;
    let selection = selection(args, &plan)?;
    let count_sql = format!(
        "SELECT count(*) FROM {} t WHERE {}",
        plan.table.qualified(),
        selection.condition
    );
    let total: i64 = match client.query_one(&count_sql, &selection.parameters()).await {
        Ok(row) => row.get(0),
        Err(error) => {
            return Err(RelayError::Config(format!(
                "{} is not a valid selection of {}: {}",
                selection.description,
                plan.table.display(),
                database.connect_error(&error).message
            )))
        }
    };
    if total == 0 {
        return Err(RelayError::NothingToReplay(format!(
            "no row of {} matches {}: rows deleted since (by --retention or the application) cannot be replayed from the table; their records stay in Kafka for the topic's retention",
            plan.table.display(),
            selection.description
        )));
    }
    let mut report = vec![format!(
        "replay {run}: {total} rows of {} where {}",
        plan.table.display(),
        selection.description
    )];
    if !args.ids.is_empty() && (total as usize) < args.ids.len() {
        report.push(format!(
            "{} of the {} ids asked for are not in the table (deleted, or never written)",
            args.ids.len() - total as usize,
            args.ids.len()
        ));
    }

    let selected = Selected::open(&database, connected.server, &plan, &selection).await?;
    if args.dry_run {
        report.extend(dry_run(&settings, &plan, selected).await?);
        return Ok(report);
    }
    drop(client);
    let mut reader = RowReader::start(selected, plan.table.clone(), 0, Lsn::ZERO);
    let counts = reader.counts();
    let metrics = Metrics::new(settings.sink.kind());
    let display = tokio::spawn(crate::rows::show_progress(Arc::clone(&metrics), total, "replay"));
    let started = Instant::now();
    let outcome = crate::app::publish_source(settings, &mut reader, Lsn::ZERO, Arc::clone(&metrics), shutdown).await;
    display.abort();
    let _ = display.await;
    drop(reader);
    let summary = format!(
        "{} published, {} dead-lettered, {} deleted before they were read; {:.1} s",
        metrics.events_published.get(),
        metrics.events_dead_lettered.get(),
        counts.gone(),
        started.elapsed().as_secs_f64()
    );
    match outcome? {
        SourceOutcome::Finished => {
            report.push(format!("replay {run} done: {summary}"));
            Ok(report)
        }
        SourceOutcome::Interrupted => Err(RelayError::Interrupted(format!(
            "replay {run} interrupted with {} of {total} rows confirmed ({summary}); run it again with --run-name {run} (rows are published again, at least once)",
            counts.confirmed()
        ))),
    }
}

/// The condition `--where`, `--since`, `--until` and `--id` make together.
fn selection(args: &ReplayArgs, plan: &Plan) -> Result<Selection, RelayError> {
    let mut conditions = Vec::new();
    let mut described = Vec::new();
    let mut parameters: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    if let Some(condition) = &args.condition {
        conditions.push(format!("({condition})"));
        described.push(condition.clone());
    }
    let time = quote_identifier(&args.time_column);
    if args.since.is_some() || args.until.is_some() {
        let column = plan.table.column(&args.time_column).ok_or_else(|| {
            RelayError::Config(format!(
                "--time-column: table {} has no column {:?} (--since and --until compare it)",
                plan.table.display(),
                args.time_column
            ))
        })?;
        for (bound, operator) in [(&args.since, ">="), (&args.until, "<")] {
            if let Some(value) = bound {
                parameters.push(Box::new(value.clone()));
                conditions.push(format!(
                    "t.{time} {operator} ${}::text::{}",
                    parameters.len(),
                    column.type_name
                ));
                described.push(format!("{} {operator} '{value}'", args.time_column));
            }
        }
    }
    if !args.ids.is_empty() {
        let id = plan
            .table
            .column(&plan.id_column)
            .ok_or_else(|| RelayError::Config(format!("the id column {:?} is missing", plan.id_column)))?;
        parameters.push(Box::new(args.ids.clone()));
        conditions.push(format!(
            "t.{} = ANY(${}::text[]::{}[])",
            quote_identifier(&plan.id_column),
            parameters.len(),
            id.type_name
        ));
        described.push(format!("{} in ({})", plan.id_column, args.ids.join(", ")));
    }
    if conditions.is_empty() {
        return Err(RelayError::Config(
            "replay needs --where, --since, --until or --id (--where true replays every row still in the table)".into(),
        ));
    }
    Ok(Selection {
        condition: conditions.join(" AND "),
        parameters,
        description: described.join(" and "),
    })
}

/// The selected rows, read through a cursor in one read-only snapshot.
struct Selected {
    database: Database,
    client: Client,
    /// How many rows were handed on so far (rows are numbered from 1).
    numbered: i64,
}

impl Selected {
    async fn open(database: &Database, server: usize, plan: &Plan, selection: &Selection) -> Result<Self, RelayError> {
        let client = database.connect_server(server).await?;
        let sql_error = |e: tokio_postgres::Error| RelayError::Connect(database.connect_error(&e));
        catalog::use_server_formats(&client).await.map_err(sql_error)?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(sql_error)?;
        let sql = format!(
            "DECLARE replay NO SCROLL CURSOR FOR SELECT {} FROM {} t WHERE {} ORDER BY t.{}, t.{}",
            plan.table.text_select_list(Some("t")),
            plan.table.qualified(),
            selection.condition,
            quote_identifier(&plan.order_column),
            quote_identifier(&plan.id_column)
        );
        client.execute(&sql, &selection.parameters()).await.map_err(sql_error)?;
        Ok(Selected {
            database: database.clone(),
            client,
            numbered: 0,
        })
    }
}

impl Batches for Selected {
    async fn next_batch(&mut self, _after: i64) -> Result<Vec<(i64, Row)>, StreamError> {
        let rows = self
            .client
            .query(&format!("FETCH {BATCH} FROM replay"), &[])
            .await
            .map_err(|e| StreamError::from_connect(self.database.connect_error(&e), "reading the rows to replay"))?;
        Ok(rows
            .into_iter()
            .map(|row| {
                self.numbered += 1;
                (self.numbered, row)
            })
            .collect())
    }

    fn first_column(&self) -> usize {
        0
    }

    async fn confirmed(&mut self, _through: i64) -> Result<(), StreamError> {
        Ok(())
    }
}

/// Maps every selected row without publishing: how many go to which topic, and which
/// cannot be published.
async fn dry_run(settings: &RelaySettings, plan: &Plan, mut selected: Selected) -> Result<Vec<String>, RelayError> {
    let mut mapper = Mapper::new(settings.template.clone(), settings.columns.clone(), &settings.source());
    mapper.relation(&plan.table.relation());
    let mut topics: BTreeMap<String, u64> = BTreeMap::new();
    let mut unmappable = 0u64;
    let mut first_problem = None;
    loop {
        let rows = selected.next_batch(0).await?;
        if rows.is_empty() {
            break;
        }
        for (number, row) in rows {
            let insert = catalog::insert_from_row(&plan.table, &row, 0);
            let position = SourcePosition {
                commit_lsn: Lsn::ZERO,
                index: u32::try_from(number).unwrap_or(u32::MAX),
            };
            match mapper.map(&insert, position) {
                Ok(event) => *topics.entry(event.topic).or_default() += 1,
                Err(error) => {
                    unmappable += 1;
                    first_problem.get_or_insert(error.to_string());
                }
            }
        }
    }
    let mut lines = vec!["dry run: nothing published; the records would go to:".to_owned()];
    lines.extend(topics.iter().map(|(topic, n)| format!("  {topic}: {n}")));
    if let Some(problem) = first_problem {
        lines.push(format!(
            "{unmappable} rows cannot be published (dead-lettered or halting as --on-poison says); the first: {problem}"
        ));
    }
    Ok(lines)
}
