//! Every setting: its flag, its environment variable and its default, in one place.
//!
//! `--help` is generated from these declarations, and README's settings table and
//! docker-compose.yml use exactly these names.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::outbox::{ColumnNames, HeaderColumn, Role, TopicTemplate};
use crate::sink::{SinkKind, SinkSettings};

#[derive(Debug, Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Publishes transactional-outbox rows from a PostgreSQL logical replication slot to Kafka or RabbitMQ, \
             confirming the slot's position only after the broker has acknowledged every event before it."
)]
pub struct Cli {
    /// Log line format.
    #[arg(long, env = "OUTBOX_RELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// TOML file of settings: keys are flag names (database_url, topic_template, ...);
    /// flags and environment variables take precedence over it.
    #[arg(long, env = "OUTBOX_RELAY_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the logical replication slot (and, with --apply-sql, the outbox table and
    /// publication). Safe to run again: it reports what exists and creates what is missing.
    /// With --backfill WHERE, also publish the rows already in the table (taking over from a
    /// poller); interrupted, the same command resumes.
    Setup(SetupArgs),
    /// Stream outbox events to the broker (--sink) until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Check every precondition of `run` with the same settings (wal_level, role,
    /// publication, slot, the broker and its destinations) and print a checklist with a fix for each
    /// failure; the exit code is 0 when `run` can start, 1 otherwise.
    Check(RunArgs),
    /// Publish again rows still in the outbox table (after a consumer's bug, to a new
    /// topic, ...), each with an `outbox.replay` header naming the run. Never touches the
    /// slot; at-least-once.
    Replay(ReplayArgs),
    /// Show the slot's lag in bytes and seconds and a verdict; the exit code is 0 healthy,
    /// 1 lagging, 2 at risk, 3 lost.
    Status(StatusArgs),
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub postgres: PostgresArgs,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// Lag in bytes above which the verdict is "lagging".
    #[arg(long, env = "OUTBOX_RELAY_MAX_LAG_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_lag_bytes: u64,

    /// Age of the oldest unconfirmed commit above which the verdict is "lagging".
    #[arg(long, env = "OUTBOX_RELAY_MAX_LAG", default_value = "60s", value_parser = humantime::parse_duration)]
    pub max_lag: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct PostgresArgs {
    /// PostgreSQL connection URL (or key=value string) of the database with the outbox
    /// table, as libpq reads it: several hosts (host1:5432,host2:5432), sslmode,
    /// sslrootcert, sslcert, sslkey, channel_binding, target_session_attrs, ...; what it
    /// leaves out comes from libpq's variables (PGHOST, PGSSLMODE, PGPASSWORD, ...).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,

    /// File holding the database password (e.g. a mounted Kubernetes Secret), read again
    /// at every connection attempt so a rotated password needs no restart.
    #[arg(long, env = "DATABASE_PASSWORD_FILE", value_name = "FILE")]
    pub database_password_file: Option<std::path::PathBuf>,

    /// Logical replication slot the relay streams from.
    #[arg(long, env = "OUTBOX_RELAY_SLOT", default_value = "outbox_relay", value_parser = parse_identifier)]
    pub slot: String,

    /// Publication that selects the outbox table's inserts.
    #[arg(long, env = "OUTBOX_RELAY_PUBLICATION", default_value = "outbox_pub", value_parser = parse_identifier)]
    pub publication: String,
}

impl PostgresArgs {
    /// The connection target these settings name, with this process's libpq variables.
    pub fn database(&self) -> Result<crate::postgres::connection::Database, crate::postgres::connection::UrlError> {
        crate::postgres::connection::Database::new(&self.database_url, self.database_password_file.clone(), &|key| {
            std::env::var(key).ok()
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated host:port (needed by run, check and
    /// setup --backfill).
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: Option<String>,

    /// Extra librdkafka property KEY=VALUE (TLS, SASL, compression, ...). Repeatable; in
    /// the environment variable, separate properties with ';'.
    #[arg(long = "kafka-property", env = "OUTBOX_RELAY_KAFKA_PROPERTIES", value_delimiter = ';', value_parser = parse_property)]
    pub kafka_properties: Vec<(String, String)>,
}

/// Where RabbitMQ is (with `--sink rabbitmq`).
#[derive(Clone, Args)]
pub struct AmqpArgs {
    /// RabbitMQ URL, amqp://user:password@host:5672/vhost (`%2f` is the vhost /; amqps://
    /// for TLS). Needed with --sink rabbitmq.
    #[arg(long, env = "AMQP_URL")]
    pub amqp_url: Option<String>,

    /// The durable topic exchange events are published to, with the topic template as
    /// routing key (`setup` declares it).
    #[arg(long, env = "OUTBOX_RELAY_AMQP_EXCHANGE", default_value = "outbox")]
    pub amqp_exchange: String,
}

/// The URL may hold a password: never print it.
impl std::fmt::Debug for AmqpArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpArgs")
            .field("amqp_url", &self.amqp_url.as_ref().map(|_| "<redacted>"))
            .field("amqp_exchange", &self.amqp_exchange)
            .finish()
    }
}

/// How rows become records: which column plays which part, and the topic.
#[derive(Debug, Clone, Args)]
pub struct MappingArgs {
    /// Column names: `default` (id, aggregate_type, aggregate_id, event_type, payload, headers)
    /// or `debezium` (id, aggregatetype, aggregateid, type, payload; other columns become
    /// headers). --column changes single roles of the preset.
    #[arg(long, env = "OUTBOX_RELAY_PRESET", value_enum, default_value_t = Preset::Default)]
    pub preset: Preset,

    /// Topic for each event: {aggregate_type}, {event_type} (the columns of those roles) and
    /// {any_column} are replaced by the row's values.
    #[arg(
        long,
        env = "OUTBOX_RELAY_TOPIC_TEMPLATE",
        default_value = "outbox.event.{aggregate_type}"
    )]
    pub topic_template: String,

    /// ROLE=COLUMN: the column that plays ROLE (id, aggregate_type, aggregate_id = the key,
    /// event_type, payload = the value, headers = a JSON object of headers); ROLE= when the
    /// table has no such column. Repeatable; in the environment variable, separate with ','.
    #[arg(long = "column", env = "OUTBOX_RELAY_COLUMNS", value_delimiter = ',', value_parser = parse_column, value_name = "ROLE=COLUMN")]
    pub columns: Vec<(Role, Option<String>)>,

    /// COLUMN[=HEADER]: publish COLUMN's value (as text) as a header, named HEADER or the
    /// column's name. Repeatable; in the environment variable, separate with ','.
    #[arg(long = "header-column", env = "OUTBOX_RELAY_HEADER_COLUMNS", value_delimiter = ',', value_parser = parse_header_column, value_name = "COLUMN[=HEADER]")]
    pub header_columns: Vec<HeaderColumn>,
}

impl MappingArgs {
    /// The topic template and column mapping these settings describe.
    pub fn mapping(&self) -> Result<(TopicTemplate, ColumnNames), crate::error::RelayError> {
        let config = crate::error::RelayError::Config;
        let template = TopicTemplate::parse(&self.topic_template).map_err(|e| config(e.to_string()))?;
        let mut names = match self.preset {
            Preset::Default => ColumnNames::default(),
            Preset::Debezium => ColumnNames::debezium(),
        };
        for (role, column) in &self.columns {
            names = names.with_column(*role, column.clone()).map_err(config)?;
        }
        names.header_columns = self.header_columns.clone();
        Ok((template, names))
    }
}

/// What publishing needs, for `run` and `setup --backfill` alike.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// The broker events are published to.
    #[arg(long, env = "OUTBOX_RELAY_SINK", value_enum, default_value_t = SinkKind::Kafka)]
    pub sink: SinkKind,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub amqp: AmqpArgs,

    #[command(flatten)]
    pub mapping: MappingArgs,

    /// exactly-once: after a restart, events an earlier run already wrote are skipped;
    /// at-least-once: they may be published again.
    #[arg(long, env = "OUTBOX_RELAY_DELIVERY", value_enum, default_value_t = Delivery::ExactlyOnce)]
    pub delivery: Delivery,

    /// What to do with an event that can never be published: send it to the dead-letter
    /// topic and go on, or stop without confirming past it.
    #[arg(long, env = "OUTBOX_RELAY_ON_POISON", value_enum, default_value_t = OnPoison::DeadLetter)]
    pub on_poison: OnPoison,

    /// Topic for events that can never be published (with --on-poison dead-letter).
    #[arg(long, env = "OUTBOX_RELAY_DEAD_LETTER_TOPIC", default_value = "outbox.dlq")]
    pub dead_letter_topic: String,

    /// Most events handed to the broker and not yet acknowledged; reading pauses at this bound.
    #[arg(long, env = "OUTBOX_RELAY_MAX_IN_FLIGHT", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// On SIGINT/SIGTERM, how long to wait for acknowledgements of events in flight.
    #[arg(long, env = "OUTBOX_RELAY_SHUTDOWN_TIMEOUT", default_value = "8s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
}

impl PublishArgs {
    /// RabbitMQ's settings, or which one is missing or wrong.
    pub fn amqp_settings(&self) -> Result<crate::sink::rabbitmq::AmqpSettings, crate::error::RelayError> {
        let config = crate::error::RelayError::Config;
        let url = self.amqp.amqp_url.as_deref().ok_or_else(|| {
            config("no RabbitMQ to publish to: set AMQP_URL (or --amqp-url) with --sink rabbitmq".into())
        })?;
        crate::sink::rabbitmq::AmqpSettings::new(url, &self.amqp.amqp_exchange).map_err(config)
    }

    /// The chosen sink's settings, or which setting it lacks.
    pub fn sink_settings(&self) -> Result<SinkSettings, crate::error::RelayError> {
        let config = crate::error::RelayError::Config;
        match self.sink {
            SinkKind::Kafka => {
                let bootstrap_servers = self.kafka.bootstrap_servers.clone().ok_or_else(|| {
                    config("no Kafka to publish to: set KAFKA_BOOTSTRAP_SERVERS (or --bootstrap-servers)".into())
                })?;
                Ok(SinkSettings::Kafka(crate::sink::kafka::ProducerSettings {
                    bootstrap_servers,
                    properties: self.kafka.kafka_properties.clone(),
                }))
            }
            SinkKind::Rabbitmq => self.amqp_settings().map(SinkSettings::Rabbitmq),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub postgres: PostgresArgs,

    #[command(flatten)]
    pub publish: PublishArgs,

    /// When another process holds the slot: wait and take over when it is released
    /// (hot standby), or exit with code 5.
    #[arg(long, env = "OUTBOX_RELAY_SLOT_BUSY", value_enum, default_value_t = SlotBusy::Wait)]
    pub slot_busy: SlotBusy,

    /// How often to write a heartbeat message into the WAL (keeps the slot advancing on an
    /// idle database and measures replication delay); 0s turns it off.
    #[arg(long, env = "OUTBOX_RELAY_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// Address of the operations endpoint: /metrics, /healthz, /readyz (port 0: any free port).
    #[arg(long, env = "OUTBOX_RELAY_METRICS_ADDR", default_value = "127.0.0.1:9187")]
    pub metrics_addr: std::net::SocketAddr,

    /// /readyz answers 503 while the oldest unconfirmed commit is older than this.
    #[arg(long, env = "OUTBOX_RELAY_READY_MAX_LAG", default_value = "60s", value_parser = humantime::parse_duration)]
    pub ready_max_lag: Duration,

    /// Delete outbox rows this long after their commit, once their events are confirmed
    /// (e.g. 1h; 0s: as soon as confirmed). Unset: rows are kept.
    #[arg(long, env = "OUTBOX_RELAY_RETENTION", value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,

    /// Longest wait between attempts to reconnect to PostgreSQL.
    #[arg(long, env = "OUTBOX_RELAY_RECONNECT_BACKOFF_MAX", default_value = "30s", value_parser = humantime::parse_duration)]
    pub reconnect_backoff_max: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    Default,
    Debezium,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Delivery {
    ExactlyOnce,
    AtLeastOnce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnPoison {
    DeadLetter,
    Halt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SlotBusy {
    Wait,
    Exit,
}

#[derive(Debug, Clone, Args)]
pub struct SetupArgs {
    #[command(flatten)]
    pub postgres: PostgresArgs,

    /// Also apply the shipped SQL: the outbox table and the publication (idempotent).
    #[arg(long, env = "OUTBOX_RELAY_APPLY_SQL")]
    pub apply_sql: bool,

    /// Make the slot failover-enabled (PostgreSQL 17+): standbys running
    /// sync_replication_slots keep a copy, so the relay resumes on a promoted standby.
    #[arg(long, env = "OUTBOX_RELAY_FAILOVER_SLOT", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub failover_slot: bool,

    /// Create the slot and publish every row that existed when it was created and matches
    /// this SQL condition (`true` for all, `status = 'PENDING'`, ...), in --backfill-order,
    /// with run's mapping, fence and delivery rules; `run` then streams everything after.
    /// Interrupted, the same command resumes. Runs as the configured role.
    #[arg(long, env = "OUTBOX_RELAY_BACKFILL", value_name = "WHERE")]
    pub backfill: Option<String>,

    /// Column giving the table's insertion order for --backfill (ties broken by the id
    /// column). Default: the id column.
    #[arg(long, env = "OUTBOX_RELAY_BACKFILL_ORDER", value_name = "COLUMN")]
    pub backfill_order: Option<String>,

    #[command(flatten)]
    pub publish: PublishArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub postgres: PostgresArgs,

    /// Replay rows matching this SQL condition on the outbox table (`true` for all).
    /// Runs as the configured role, only inside the replay's own query.
    #[arg(long = "where", value_name = "WHERE")]
    pub condition: Option<String>,

    /// Replay rows whose --time-column is at or after this time (e.g. 2026-11-29T08:00:00Z).
    #[arg(long, value_name = "TIMESTAMP")]
    pub since: Option<String>,

    /// Replay rows whose --time-column is before this time.
    #[arg(long, value_name = "TIMESTAMP")]
    pub until: Option<String>,

    /// The column --since and --until compare.
    #[arg(long, default_value = "created_at", value_name = "COLUMN")]
    pub time_column: String,

    /// Replay the row with this id (the id column's value). Repeatable.
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<String>,

    /// Order of the replayed rows (ties broken by the id column). Default: the id column.
    #[arg(long, value_name = "COLUMN")]
    pub order_by: Option<String>,

    /// Name of this replay, carried by every record's `outbox.replay` header. Default:
    /// `replay-` and the start time.
    #[arg(long, value_name = "NAME")]
    pub run_name: Option<String>,

    /// Print how many rows would be replayed and to which topics; publish nothing.
    #[arg(long)]
    pub dry_run: bool,

    #[command(flatten)]
    pub publish: PublishArgs,
}

/// Slot and publication names go into replication commands verbatim, so only
/// PostgreSQL's plain identifier characters are accepted (the slot-name rule).
fn parse_identifier(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 63
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(text.to_owned())
    } else {
        Err("use 1 to 63 characters of a-z, 0-9 and _".into())
    }
}

fn parse_column(text: &str) -> Result<(Role, Option<String>), String> {
    let (role, column) = text
        .split_once('=')
        .ok_or_else(|| format!("expected ROLE=COLUMN (or ROLE= for none), got {text:?}"))?;
    let role = role.trim().parse::<Role>()?;
    let column = column.trim();
    Ok((role, (!column.is_empty()).then(|| column.to_owned())))
}

fn parse_header_column(text: &str) -> Result<HeaderColumn, String> {
    let (column, header) = text.split_once('=').unwrap_or((text, text));
    let (column, header) = (column.trim(), header.trim());
    if column.is_empty() || header.is_empty() {
        return Err(format!("expected COLUMN or COLUMN=HEADER, got {text:?}"));
    }
    Ok(HeaderColumn {
        column: column.to_owned(),
        header: header.to_owned(),
    })
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn identifiers_are_plain() {
        assert!(parse_identifier("outbox_relay_2").is_ok());
        for bad in ["", "Outbox", "a-b", "a b", "x'; DROP", &"a".repeat(64)] {
            assert!(parse_identifier(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn columns_and_header_columns_parse() {
        assert_eq!(
            parse_column("aggregate_id=order_id"),
            Ok((Role::AggregateId, Some("order_id".into())))
        );
        assert_eq!(parse_column("aggregate_type="), Ok((Role::AggregateType, None)));
        assert!(parse_column("key=order_id").is_err());
        assert!(parse_column("payload").is_err());
        let header = |column: &str, header: &str| HeaderColumn {
            column: column.into(),
            header: header.into(),
        };
        assert_eq!(parse_header_column("tenant"), Ok(header("tenant", "tenant")));
        assert_eq!(parse_header_column("tenant=x-tenant"), Ok(header("tenant", "x-tenant")));
        assert!(parse_header_column("=x").is_err());
    }

    #[test]
    fn properties_are_key_value() {
        assert_eq!(parse_property("linger.ms=5"), Ok(("linger.ms".into(), "5".into())));
        assert_eq!(
            parse_property("sasl.jaas.config=a=b"),
            Ok(("sasl.jaas.config".into(), "a=b".into()))
        );
        assert!(parse_property("novalue").is_err());
    }
}
