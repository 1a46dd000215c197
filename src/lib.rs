//! outbox-relay: publishes transactional-outbox rows from a PostgreSQL logical
//! replication slot to Kafka (or RabbitMQ), and confirms the slot's position only after the broker has
//! acknowledged every event before it.
//!
//! The path of an event, module by module:
//!
//! - [`postgres::target`]: the one connection target (hosts, TLS, credentials, timeouts)
//!   from which [`postgres::connection`] builds every SQL connection and the replication
//!   connection alike; [`postgres::tls`] puts both on rustls.
//! - [`postgres::stream`]: the walsender stream of the slot (replication protocol).
//! - [`postgres::pgoutput`]: decodes each `pgoutput` message.
//! - [`outbox`]: turns an inserted outbox row into a record (topic, key, value, headers), by a column mapping
//!   ([`outbox::columns`]) and a topic template ([`outbox::template`]); [`debezium_values`]
//!   writes column values in headers as Debezium does, under `--preset debezium`.
//! - [`publisher`]: hands mapped events to the sink, dead-letters what can never be
//!   published, and notes what `progress` must hear.
//! - [`sink`]: where events go, one boundary for every broker: [`sink::kafka`] (the
//!   idempotent producer, its error classes, the partition fence that makes publishing
//!   exactly-once across restarts, the pipeline of deliveries) and [`sink::rabbitmq`]
//!   (a channel in confirm mode).
//! - [`dead_letter`]: the record for an event that can never be published.
//! - [`progress`]: the only place that decides which LSN to confirm; monotonic.
//! - [`app`]: wires them into one loop ([`app`]'s session loop), and reconnects when PostgreSQL goes away. The loop
//!   reads a [`source::Source`]: the walsender stream, or rows read by SQL ([`rows`]) for a
//!   [`backfill`] (`setup --backfill`, the rows a new slot will not stream) or a [`replay`].
//!
//! Around them: [`config`] (every setting), [`config_file`] (`--config relay.toml`), [`setup`] (slot and SQL), [`check`] (preconditions as a checklist), [`status`] (lag and
//! verdict), [`postgres::slot`]
//! (inspecting the slot), [`error`] (what ends a run), [`shutdown`] (the stop signal),
//! [`monitor`] (heartbeat that keeps an idle slot moving; samples slot and broker),
//! [`cleanup`] (deletes published rows after `--retention`), both run by [`periodic`],
//! [`metrics`], [`readiness`] and [`http`] (Prometheus, health and readiness), [`lsn`]
//! (WAL positions), [`clock`] (Unix and PostgreSQL time), [`postgres::catalog`] (the
//! publication's tables and columns, rows read by SQL as the stream carries them).

pub mod app;
pub mod backfill;
pub mod check;
pub mod cleanup;
pub mod clock;
pub mod config;
pub mod config_file;
pub mod dead_letter;
pub mod debezium_values;
pub mod error;
pub mod http;
pub mod lsn;
pub mod metrics;
pub mod monitor;
pub mod outbox;
pub mod periodic;
pub mod postgres;
pub mod progress;
pub mod publisher;
pub mod readiness;
pub mod replay;
pub mod rows;
pub mod setup;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod status;
