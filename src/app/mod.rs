//! Wires the parts together: source (slot or rows) → decoder → mapper → publisher → sink
//! → progress → source.
//!
//! [`session`] holds the loop; this file builds what it needs from the settings, starts
//! the operations endpoint, the monitor and the cleaner beside it, and runs a source that
//! ends (a backfill, a replay) through the same loop.

mod backoff;
mod session;

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Delivery, OnPoison, PostgresArgs, PublishArgs, RunArgs, SlotBusy};
use crate::error::RelayError;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::monitor::Monitor;
use crate::outbox::{ColumnNames, TopicTemplate};
use crate::postgres::connection::Database;
use crate::progress::Progress;
use crate::readiness::Health;
use crate::shutdown::Shutdown;
use crate::sink::{AnySink, SinkSettings};
use crate::source::Source;
use session::{Interrupt, Relay};

/// Everything `run` needs, validated.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub database: Database,
    pub slot: String,
    pub publication: String,
    pub sink: SinkSettings,
    pub template: TopicTemplate,
    pub columns: ColumnNames,
    pub delivery: Delivery,
    pub on_poison: OnPoison,
    pub dead_letter_topic: String,
    pub slot_busy: SlotBusy,
    pub heartbeat_interval: Duration,
    pub metrics_addr: std::net::SocketAddr,
    pub ready_max_lag: Duration,
    pub max_in_flight: usize,
    pub shutdown_timeout: Duration,
    pub reconnect_backoff_max: Duration,
    pub retention: Option<Duration>,
    /// Set for `replay`: the run's name, carried by every record.
    pub replay_run: Option<String>,
}

impl RelaySettings {
    pub fn from_args(args: &RunArgs) -> Result<Self, RelayError> {
        Ok(RelaySettings {
            slot_busy: args.slot_busy,
            heartbeat_interval: args.heartbeat_interval,
            metrics_addr: args.metrics_addr,
            ready_max_lag: args.ready_max_lag,
            reconnect_backoff_max: args.reconnect_backoff_max,
            retention: args.retention,
            ..Self::for_publishing(&args.postgres, &args.publish)?
        })
    }

    /// The settings a publisher needs (`setup --backfill`), with `run`'s defaults for the rest.
    pub fn for_publishing(postgres: &PostgresArgs, publish: &PublishArgs) -> Result<Self, RelayError> {
        crate::outbox::validate_topic_name(&publish.dead_letter_topic)
            .map_err(|e| RelayError::Config(format!("--dead-letter-topic: {e}")))?;
        let (template, columns) = publish.mapping.mapping()?;
        Ok(RelaySettings {
            database: postgres.database()?,
            slot: postgres.slot.clone(),
            publication: postgres.publication.clone(),
            sink: publish.sink_settings()?,
            template,
            columns,
            delivery: publish.delivery,
            on_poison: publish.on_poison,
            dead_letter_topic: publish.dead_letter_topic.clone(),
            slot_busy: SlotBusy::Wait,
            heartbeat_interval: Duration::ZERO,
            metrics_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            ready_max_lag: Duration::from_secs(60),
            max_in_flight: publish.max_in_flight as usize,
            shutdown_timeout: publish.shutdown_timeout,
            reconnect_backoff_max: Duration::from_secs(30),
            retention: None,
            replay_run: None,
        })
    }

    /// The sink these settings name; it connects on first use.
    fn open_sink(&self, metrics: &Arc<Metrics>) -> Result<AnySink, RelayError> {
        let exactly_once = self.delivery == Delivery::ExactlyOnce;
        AnySink::new(&self.sink, &self.source(), exactly_once, Arc::clone(metrics))
    }

    /// The `outbox.source` of this relay's records: database and slot.
    pub fn source(&self) -> String {
        format!("{}/{}", self.database.dbname(), self.slot)
    }
}

/// Streams until `shutdown` fires (`Ok`) or a definite error (`Err`).
pub async fn run(settings: RelaySettings, shutdown: Shutdown) -> Result<(), RelayError> {
    let metrics = Metrics::new(settings.sink.kind());
    let mut sink = settings.open_sink(&metrics)?;
    if settings.delivery == Delivery::ExactlyOnce && !matches!(settings.sink, SinkSettings::Kafka(_)) {
        tracing::info!(
            sink = settings.sink.kind().as_str(),
            "delivery is at least once with this broker (no way to read back what an earlier run wrote); consumers deduplicate on the message id"
        );
    }
    sink.prepare().await?;
    let health = Arc::new(Health::default());
    let (address, server) = crate::http::bind(
        settings.metrics_addr,
        Arc::clone(&metrics),
        Arc::clone(&health),
        settings.ready_max_lag,
        shutdown.clone(),
    )
    .await
    .map_err(|e| {
        RelayError::Config(format!(
            "cannot listen on --metrics-addr {}: {e}",
            settings.metrics_addr
        ))
    })?;
    tracing::info!(%address, "operations endpoint listening (/metrics, /healthz, /readyz)");
    let server = tokio::spawn(server);
    let monitor = Monitor {
        database: settings.database.clone(),
        slot: settings.slot.clone(),
        heartbeat_interval: settings.heartbeat_interval,
        broker: sink.probe(),
        metrics: Arc::clone(&metrics),
        health: Arc::clone(&health),
    };
    let monitor = tokio::spawn(monitor.run(shutdown.clone()));
    let (confirmed, confirmed_seen) = tokio::sync::watch::channel(Lsn::ZERO);
    let cleaner = settings.retention.map(|retention| {
        let cleaner = crate::cleanup::Cleaner {
            database: settings.database.clone(),
            publication: settings.publication.clone(),
            retention,
            confirmed: confirmed_seen,
            metrics: Arc::clone(&metrics),
        };
        tokio::spawn(cleaner.run(shutdown.clone()))
    });

    let mut relay = Relay::new(settings, sink, metrics, health, confirmed, shutdown.clone());
    let result = relay.run(shutdown).await;
    let m = &relay.metrics;
    tracing::info!(
        published = m.events_published.get(),
        skipped_as_already_written = m.events_skipped_already_written.get(),
        dead_lettered = m.events_dead_lettered.get(),
        "totals"
    );
    // Both end on the shutdown signal; after a failure they are stopped here.
    monitor.abort();
    server.abort();
    if let Some(cleaner) = cleaner {
        cleaner.abort();
        let _ = cleaner.await;
    }
    let _ = monitor.await;
    let _ = server.await;
    result
}

/// How a source that ends (a backfill) finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceOutcome {
    /// Every event was read and acknowledged (or dead-lettered).
    Finished,
    /// Shutdown came first; what was acknowledged is confirmed.
    Interrupted,
}

/// Publishes every event of `source` with `run`'s mapping, fence, delivery and progress
/// rules, starting after position `start`; `source` is told what is confirmed.
pub async fn publish_source<S: Source>(
    settings: RelaySettings,
    source: &mut S,
    start: Lsn,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) -> Result<SourceOutcome, RelayError> {
    let sink = settings.open_sink(&metrics)?;
    let (confirmed, _) = tokio::sync::watch::channel(start);
    let limit = settings.shutdown_timeout;
    let mut relay = Relay::new(settings, sink, metrics, Arc::default(), confirmed, shutdown.clone());
    relay.progress = Some(Progress::new(start));
    let outcome = match relay.pump(source, &mut shutdown).await {
        Interrupt::Ended => relay.settle_all(source, &mut shutdown).await,
        Interrupt::Shutdown => Ok(SourceOutcome::Interrupted),
        Interrupt::Failed(error) => Err(error),
    };
    if !matches!(outcome, Ok(SourceOutcome::Finished)) {
        let (_never, mut no_shutdown) = crate::shutdown::channel();
        if relay.drain(Some(limit), &mut no_shutdown).await.is_err() {
            tracing::warn!(
                in_flight = relay.publisher.in_flight(),
                "events still unacknowledged at exit; they will be sent again"
            );
        }
        // What the drain acknowledged is confirmed too, so a resumed run starts after it.
        if let Some(progress) = &relay.progress {
            source.confirm(progress.confirmed());
        }
    }
    outcome
}
