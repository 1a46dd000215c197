//! `outbox-relay check`: every precondition of `run`, as a checklist with a fix for each
//! failure.
//!
//! It takes exactly `run`'s settings (flags, environment, `--config`), so a green check
//! means `run` with the same settings starts streaming. It changes nothing: it reads
//! catalogs and asks Kafka for metadata (which, like the relay's first record, lets a
//! broker with `auto.create.topics.enable` create the dead-letter topic).

use std::fmt::Write as _;

use tokio_postgres::Client;

use crate::app::RelaySettings;
use crate::config::RunArgs;
use crate::outbox::{Mapper, OutboxEvent, SourcePosition};
use crate::postgres::failover;
use crate::postgres::slot::{self, SlotProblem};
use crate::postgres::stream::ReplicationStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// Works, with a limitation worth knowing.
    Warn,
    Fail,
    /// Not checked because an earlier check failed.
    Skip,
}

/// One line of the checklist.
#[derive(Debug, Clone)]
pub struct Item {
    pub outcome: Outcome,
    pub what: String,
    pub fix: Option<String>,
}

impl Item {
    pub(crate) fn pass(what: impl Into<String>) -> Self {
        Item {
            outcome: Outcome::Pass,
            what: what.into(),
            fix: None,
        }
    }

    pub(crate) fn fail(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Item {
            outcome: Outcome::Fail,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }

    fn warn(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Item {
            outcome: Outcome::Warn,
            fix: Some(fix.into()),
            ..Item::pass(what)
        }
    }

    pub(crate) fn skip(what: impl Into<String>) -> Self {
        Item {
            outcome: Outcome::Skip,
            ..Item::pass(what)
        }
    }
}

/// The whole checklist.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub items: Vec<Item>,
}

impl Report {
    pub fn failures(&self) -> usize {
        self.items.iter().filter(|i| i.outcome == Outcome::Fail).count()
    }

    /// 0 when `run` can start, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.failures() > 0)
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        for item in &self.items {
            let mark = match item.outcome {
                Outcome::Pass => "ok  ",
                Outcome::Warn => "warn",
                Outcome::Fail => "FAIL",
                Outcome::Skip => "skip",
            };
            let _ = writeln!(text, "[{mark}] {}", item.what);
            if let Some(fix) = &item.fix {
                let _ = writeln!(text, "       fix: {fix}");
            }
        }
        let _ = match self.failures() {
            0 => writeln!(text, "ready: `outbox-relay run` with these settings can start"),
            n => writeln!(text, "{n} problem(s) to fix before `outbox-relay run` can start"),
        };
        text
    }
}

/// Runs every check.
pub async fn check(args: &RunArgs) -> Report {
    let mut report = Report::default();
    let settings = match RelaySettings::from_args(args) {
        Ok(settings) => {
            report.items.push(Item::pass("configuration is valid"));
            settings
        }
        Err(error) => {
            report.items.push(Item::fail(
                format!("configuration: {error}"),
                "correct the setting named above (flag, environment variable or --config file)",
            ));
            return report;
        }
    };
    postgres_checks(&settings, &mut report).await;
    let broker = crate::sink::check(&settings.sink, &settings.dead_letter_topic).await;
    report.items.extend(broker);
    report
}

async fn postgres_checks(settings: &RelaySettings, report: &mut Report) {
    let database = &settings.database;
    let connected = match database.open().await {
        Ok(connected) => connected,
        Err(error) => {
            report
                .items
                .push(Item::fail(format!("PostgreSQL: {error}"), connect_fix(&error.message)));
            report
                .items
                .push(Item::skip("wal_level, role, publication and slot (no connection)"));
            return;
        }
    };
    let (client, server) = (connected.client, connected.server);
    let host = database.server_label(server);
    let items = match postgres_items(settings, &client).await {
        Ok(items) => items,
        Err(error) => vec![Item::fail(
            format!("PostgreSQL query failed: {}", database.connect_error(&error)),
            "check that the server is PostgreSQL 14 or later and that the role may read the catalogs",
        )],
    };
    let tls = sql_tls(&client).await;
    report.items.push(Item::pass(format!(
        "SQL connection to {host} ({tls}) as {}",
        database.display()
    )));
    // Without REPLICATION the walsender refuses the role: one problem, said once.
    let may_replicate = items.iter().all(|item| !item.what.contains(LACKS_REPLICATION));
    report.items.push(if may_replicate {
        replication_connection(database, server, &host).await
    } else {
        Item::skip(format!("replication connection to {host} (the role lacks REPLICATION)"))
    });
    report.items.extend(items);
    match failover::inspect(database, &client, server, &settings.slot).await {
        Ok(readiness) => {
            report.items.extend(
                readiness
                    .findings(&settings.slot)
                    .into_iter()
                    .map(|finding| match finding.fix {
                        Some(fix) if !finding.ok => Item::warn(finding.what, fix),
                        _ => Item::pass(finding.what),
                    }),
            )
        }
        Err(error) => report.items.push(Item::warn(
            format!(
                "failover readiness could not be read: {}",
                database.connect_error(&error)
            ),
            "check that the role may read pg_replication_slots and settings",
        )),
    }
}

/// How the role check words a role without the REPLICATION attribute.
const LACKS_REPLICATION: &str = "lacks the REPLICATION attribute";

/// The fix for a failed connection, from what failed.
fn connect_fix(message: &str) -> &'static str {
    if message.starts_with("TLS") || message.contains("certificate") {
        "give sslrootcert the CA that signed the server's certificate and connect by the name in it (sslmode=verify-full), or choose a weaker sslmode knowingly"
    } else if crate::postgres::connection::requires_tls(message) {
        "add sslmode=require (better: sslmode=verify-full&sslrootcert=<CA file>) to --database-url"
    } else {
        "check --database-url (DATABASE_URL), the password source, that the server runs, and that pg_hba.conf admits this user"
    }
}

/// `TLSv1.3` or `plain text`, as the server sees this session.
async fn sql_tls(client: &Client) -> String {
    let row = client
        .query_opt(
            "SELECT ssl, coalesce(version, '') FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await;
    match row {
        Ok(Some(row)) if row.get::<_, bool>(0) => row.get::<_, String>(1),
        Ok(_) => "plain text".to_owned(),
        Err(_) => "TLS unknown".to_owned(),
    }
}

/// Opens a replication connection to the same server as `run` would, without streaming.
async fn replication_connection(database: &crate::postgres::connection::Database, server: usize, host: &str) -> Item {
    match ReplicationStream::probe(database, server).await {
        Ok(probe) => Item::pass(format!(
            "replication connection to {host} ({}): system {}, timeline {}",
            probe.tls.as_deref().unwrap_or("plain text"),
            probe.system_id,
            probe.timeline
        )),
        Err(error) => Item::fail(
            format!("replication connection to {host}: {error}"),
            connect_fix(&error.to_string()),
        ),
    }
}

async fn postgres_items(settings: &RelaySettings, client: &Client) -> Result<Vec<Item>, tokio_postgres::Error> {
    let mut items = vec![wal_level(client).await?, replication_role(client).await?];
    items.extend(publication(settings, client).await?);
    items.push(slot_item(settings, client).await?);
    if !settings.heartbeat_interval.is_zero() {
        items.push(heartbeat(client).await?);
    }
    if settings.retention.is_some() {
        items.extend(retention(settings, client).await?);
    }
    Ok(items)
}

async fn wal_level(client: &Client) -> Result<Item, tokio_postgres::Error> {
    let level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    Ok(if level == "logical" {
        Item::pass("wal_level = logical")
    } else {
        Item::fail(
            format!("wal_level = {level}: logical decoding needs wal_level = logical"),
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
        )
    })
}

/// Roles of managed services that stand in for the REPLICATION attribute, and where.
const MANAGED_REPLICATION_ROLES: [(&str, &str); 1] = [("rds_replication", "Amazon RDS / Aurora")];

async fn replication_role(client: &Client) -> Result<Item, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_user::text, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (role, replication, superuser): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
    if replication || superuser {
        let how = if replication { "REPLICATION" } else { "superuser" };
        return Ok(Item::pass(format!("role {role} may stream replication ({how})")));
    }
    for (managed, service) in MANAGED_REPLICATION_ROLES {
        let member: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = $1 AND pg_has_role(current_user, r.oid, 'MEMBER'))",
                &[&managed],
            )
            .await?
            .get(0);
        if member {
            return Ok(Item::pass(format!(
                "role {role} may stream replication (member of {managed}, {service})"
            )));
        }
    }
    Ok(Item::fail(
        format!("role {role} {LACKS_REPLICATION}, needed to stream the slot"),
        format!(
            "as a superuser: ALTER ROLE {role} REPLICATION; on Amazon RDS/Aurora: GRANT rds_replication TO {role}; (or use the role of sql/003_relay_role.sql)"
        ),
    ))
}

async fn publication(settings: &RelaySettings, client: &Client) -> Result<Vec<Item>, tokio_postgres::Error> {
    let name = &settings.publication;
    let Some(row) = client
        .query_opt("SELECT pubinsert FROM pg_publication WHERE pubname = $1", &[name])
        .await?
    else {
        let problem = SlotProblem::PublicationMissing {
            publication: name.clone(),
            database: settings.database.dbname().to_owned(),
        };
        return Ok(vec![Item::fail(
            format!(
                "publication {name} does not exist in database {}",
                settings.database.dbname()
            ),
            problem.fix(),
        )]);
    };
    if !row.get::<_, bool>(0) {
        return Ok(vec![Item::fail(
            format!("publication {name} does not publish inserts"),
            format!("ALTER PUBLICATION {name} SET (publish = 'insert');"),
        )]);
    }
    let tables = crate::postgres::catalog::publication_tables(client, name).await?;
    if tables.is_empty() {
        return Ok(vec![Item::warn(
            format!(
                "publication {name} has no tables: only table-less events (pg_logical_emit_message) will be published"
            ),
            format!("ALTER PUBLICATION {name} ADD TABLE public.outbox;"),
        )]);
    }
    let names: Vec<String> = tables.iter().map(|table| table.display()).collect();
    let mut items = vec![Item::pass(format!(
        "publication {name} publishes inserts of {}",
        names.join(", ")
    ))];
    for table in &tables {
        items.push(mapping_item(settings, client, table).await?);
        if let Some(reason) = crate::backfill::unfinished(client, table, &settings.slot).await? {
            items.push(Item::fail(
                reason,
                "run the backfill command again; it resumes where it stopped",
            ));
        }
    }
    Ok(items)
}

/// Checks the column mapping against `table` and shows the record its first row becomes.
async fn mapping_item(
    settings: &RelaySettings,
    client: &Client,
    table: &crate::postgres::catalog::PublishedTable,
) -> Result<Item, tokio_postgres::Error> {
    if let Err(problem) = settings
        .columns
        .validate(&table.display(), &table.columns, &settings.template)
    {
        return Ok(Item::fail(
            format!("mapping: {problem}"),
            "map each role to a column of the table with --column ROLE=COLUMN (ROLE= when there is none), or pick the matching --preset",
        ));
    }
    crate::postgres::catalog::use_server_formats(client).await?;
    let Some(row) = crate::postgres::catalog::sample_row(client, table).await? else {
        return Ok(Item::pass(format!(
            "mapping fits table {} (it has no row to show as a sample record)",
            table.display()
        )));
    };
    let mut mapper = Mapper::new(settings.template.clone(), settings.columns.clone(), &settings.source());
    mapper.relation(&table.relation());
    let position = SourcePosition {
        commit_lsn: crate::lsn::Lsn::ZERO,
        index: 0,
    };
    Ok(match mapper.map(&row, position) {
        Ok(event) => Item::pass(format!(
            "mapping fits table {}; a row of it becomes:\n{}",
            table.display(),
            sample_record(&event)
        )),
        Err(error) => Item::warn(
            format!(
                "mapping fits table {}, but a row of it cannot be published: {error}",
                table.display()
            ),
            "such rows go to the dead-letter topic (or halt with --on-poison halt); fix the row or the mapping",
        ),
    })
}

/// A record as lines for people: topic, key, value and headers, long values cut short.
fn sample_record(event: &OutboxEvent) -> String {
    fn shown(bytes: Option<&[u8]>) -> String {
        match bytes {
            None => "(none)".to_owned(),
            Some(bytes) => {
                let text = String::from_utf8_lossy(bytes);
                let cut: String = text.chars().take(120).collect();
                let more = if cut.len() < text.len() { "..." } else { "" };
                format!("{cut:?}{more} ({} bytes)", bytes.len())
            }
        }
    }
    let mut text = format!(
        "         topic   {}\n         key     {}\n         value   {}",
        event.topic,
        shown(event.key.as_deref()),
        shown(event.payload.as_deref())
    );
    for (name, value) in &event.headers {
        if name.starts_with("outbox.") {
            continue;
        }
        let _ = write!(text, "\n         header  {name} = {}", shown(value.as_deref()));
    }
    text
}

async fn slot_item(settings: &RelaySettings, client: &Client) -> Result<Item, tokio_postgres::Error> {
    let name = &settings.slot;
    let info = slot::inspect(client, name).await?;
    Ok(match slot::check(info, name, settings.database.dbname()) {
        Ok(info) => Item::pass(format!(
            "slot {name} (pgoutput) confirmed at {}, wal_status {}",
            info.confirmed_flush_lsn.unwrap_or_default(),
            info.wal_status.as_deref().unwrap_or("unknown")
        )),
        Err(problem @ SlotProblem::Missing { .. }) => {
            let free: i64 = client
                .query_one(
                    "SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)",
                    &[],
                )
                .await?
                .get(0);
            let fix = if free > 0 {
                problem.fix()
            } else {
                "raise max_replication_slots (every slot is in use) and restart PostgreSQL, then run `outbox-relay setup`"
            };
            Item::fail(format!("slot {name} does not exist"), fix)
        }
        Err(problem) => Item::fail(format!("slot {name} is unusable: {problem}"), problem.fix()),
    })
}

async fn heartbeat(client: &Client) -> Result<Item, tokio_postgres::Error> {
    let allowed: bool = client
        .query_one(
            // The (boolean, text, text) form; PostgreSQL 17 added a fourth argument with a
            // default, so the function is found by its arguments rather than named by them.
            "SELECT coalesce(bool_or(has_function_privilege(oid, 'EXECUTE')), false) FROM pg_proc
              WHERE proname = 'pg_logical_emit_message' AND pronamespace = 'pg_catalog'::regnamespace
                AND proargtypes[2] = 'text'::regtype",
            &[],
        )
        .await?
        .get(0);
    Ok(if allowed {
        Item::pass("heartbeat: the role may write logical messages")
    } else {
        Item::warn(
            "heartbeat: the role may not call pg_logical_emit_message, so the heartbeat stays off",
            "GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO <role>; (PostgreSQL 17+: pg_logical_emit_message(boolean, text, text, boolean))",
        )
    })
}

async fn retention(settings: &RelaySettings, client: &Client) -> Result<Vec<Item>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT format('%I.%I', schemaname, tablename), has_table_privilege(format('%I.%I', schemaname, tablename), 'DELETE')
               FROM pg_publication_tables WHERE pubname = $1",
            &[&settings.publication],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let (table, allowed): (String, bool) = (row.get(0), row.get(1));
            if allowed {
                Item::pass(format!("--retention: the role may delete from {table}"))
            } else {
                Item::fail(
                    format!("--retention: the role may not delete from {table}"),
                    format!("GRANT DELETE ON {table} TO <role>; (or drop --retention)"),
                )
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_prints_its_fix_and_sets_the_exit_code() {
        let report = Report {
            items: vec![
                Item::pass("wal_level = logical"),
                Item::fail("role x lacks REPLICATION", "ALTER ROLE x REPLICATION;"),
            ],
        };
        let text = report.render();
        assert!(text.contains("[ok  ] wal_level = logical"), "{text}");
        assert!(
            text.contains("[FAIL] role x lacks REPLICATION\n       fix: ALTER ROLE x REPLICATION;"),
            "{text}"
        );
        assert_eq!(report.exit_code(), 1);
        assert_eq!(
            Report {
                items: vec![Item::pass("a")]
            }
            .exit_code(),
            0
        );
    }

    #[test]
    fn a_slot_problem_names_its_fix_in_its_message() {
        let problem = SlotProblem::PublicationMissing {
            publication: "p".into(),
            database: "d".into(),
        };
        assert!(problem.fix().starts_with("create it with sql/002_publication.sql"));
        assert!(problem.to_string().ends_with(problem.fix()), "{problem}");
    }
}
