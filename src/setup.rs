//! `outbox-relay setup`: prepares a database for the relay and says what it did.
//!
//! Creates only what is missing: the shipped SQL (with `--apply-sql`), the logical slot,
//! and for RabbitMQ the exchange and the dead-letter queue. It is the only command that creates a slot (see `postgres::slot`).

use crate::config::SetupArgs;
use crate::error::RelayError;
use crate::postgres::slot::{self, SlotProblem};
use crate::postgres::stream::ReplicationStream;

/// The SQL files shipped in `sql/`, applied in this order by `--apply-sql`.
pub const SHIPPED_SQL: [(&str, &str); 2] = [
    ("sql/001_outbox_table.sql", include_str!("../sql/001_outbox_table.sql")),
    ("sql/002_publication.sql", include_str!("../sql/002_publication.sql")),
];

/// The publication name as written in the shipped SQL.
const SHIPPED_PUBLICATION: &str = "outbox_pub";

/// Runs setup; returns one line per thing checked or done.
pub async fn setup(args: &SetupArgs, shutdown: crate::shutdown::Shutdown) -> Result<Vec<String>, RelayError> {
    let database = args.postgres.database()?;
    let connected = database.open().await?;
    let (client, server) = (connected.client, connected.server);
    let sql_error = |e: tokio_postgres::Error| RelayError::Connect(database.connect_error(&e));
    let mut report = Vec::new();

    let wal_level: String = client.query_one("SHOW wal_level", &[]).await.map_err(sql_error)?.get(0);
    if wal_level != "logical" {
        return Err(RelayError::Config(format!(
            "PostgreSQL runs with wal_level = {wal_level}; logical replication needs wal_level = logical (set it in postgresql.conf and restart the server)"
        )));
    }
    report.push("wal_level is logical".to_owned());

    if args.apply_sql {
        for (name, sql) in SHIPPED_SQL {
            // Identifiers are validated by the command line (a-z, 0-9, _).
            let sql = sql.replace(SHIPPED_PUBLICATION, &args.postgres.publication);
            client.batch_execute(&sql).await.map_err(sql_error)?;
            report.push(format!("applied {name}"));
        }
    }

    let publication = &args.postgres.publication;
    if !slot::publication_exists(&client, publication)
        .await
        .map_err(sql_error)?
    {
        return Err(SlotProblem::PublicationMissing {
            publication: publication.clone(),
            database: database.dbname().to_owned(),
        }
        .into());
    }
    report.push(format!("publication {publication} exists"));

    // The broker's side, where it has one to prepare (Kafka creates topics on demand).
    if args.publish.sink == crate::sink::SinkKind::Rabbitmq {
        let amqp = args.publish.amqp_settings()?;
        let declared = crate::sink::rabbitmq::declare(&amqp, &args.publish.dead_letter_topic)
            .await
            .map_err(RelayError::from)?;
        report.extend(declared);
    }

    if let Some(condition) = &args.backfill {
        let lines = crate::backfill::backfill(args, condition, &database, client, server, shutdown).await?;
        report.extend(lines);
        return Ok(report);
    }

    let slot_name = &args.postgres.slot;
    let major = slot::server_major(&client).await.map_err(sql_error)?;
    match slot::inspect(&client, slot_name).await.map_err(sql_error)? {
        Some(info) => {
            let info = slot::check(Some(info), slot_name, database.dbname())?;
            let confirmed = info.confirmed_flush_lsn.map(|l| l.to_string()).unwrap_or_default();
            report.push(format!(
                "slot {slot_name} exists (confirmed up to {confirmed}); left as it is"
            ));
            if args.failover_slot && info.failover == Some(false) {
                report.push(match ReplicationStream::enable_failover(&database, server, slot_name).await {
                    Ok(()) => format!("slot {slot_name} is now failover-enabled"),
                    Err(error) => format!(
                        "slot {slot_name} is not failover-enabled and could not be made so ({error}); run setup again while no relay streams from it"
                    ),
                });
            }
        }
        None => match slot::create(&client, slot_name, args.failover_slot).await {
            Ok((lsn, failover)) => report.push(format!(
                "created slot {slot_name} (pgoutput{}) at {lsn}",
                match (failover, major >= slot::FAILOVER_SLOTS_SINCE) {
                    (true, _) => ", failover-enabled",
                    (false, true) => ", failover off by --failover-slot false",
                    (false, false) => "; PostgreSQL before 17 has no failover slots",
                }
            )),
            // Created meanwhile by another setup: fine, as long as it is the right kind.
            Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {
                let info = slot::inspect(&client, slot_name).await.map_err(sql_error)?;
                slot::check(info, slot_name, database.dbname())?;
                report.push(format!("slot {slot_name} exists; left as it is"));
            }
            Err(error) => return Err(sql_error(error)),
        },
    }
    Ok(report)
}
