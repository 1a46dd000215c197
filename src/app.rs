//! Wires the parts together: slot → decoder → mapper → fence → Kafka pipeline → progress
//! → slot.
//!
//! One session is one replication connection. Within it a single biased `select!` loop
//! reads the stream while the window of events in flight has room, and turns broker
//! acknowledgements into progress. Across sessions the relay keeps what it confirmed:
//! after a lost connection it waits for the events already handed to Kafka, then starts
//! the next session at the newest position whose events are all acknowledged.

use std::collections::VecDeque;
use std::time::Duration;

use std::sync::Arc;

use crate::config::{Delivery, OnPoison, PostgresArgs, PublishArgs, RunArgs, SlotBusy};
use crate::dead_letter::DeadLetter;
use crate::error::{Classify, ErrorClass, RelayError};
use crate::kafka::{
    is_too_large, Acked, Failure, Fence, FenceError, Pipeline, Producer, ProducerSettings, Route, SubmitError, TopicId,
};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::monitor::Monitor;
use crate::outbox::{ColumnNames, Mapper, OutboxEvent, SourcePosition, TopicTemplate};
use crate::postgres::connection::Database;
use crate::postgres::pgoutput::Message;
use crate::postgres::slot;
use crate::postgres::stream::{ReplicationStream, StreamError, StreamEvent};
use crate::progress::{Progress, TxnId};
use crate::readiness::Health;
use crate::shutdown::Shutdown;
use crate::source::{Confirm, Source};

/// How often a standby relay asks for the slot while another process holds it.
const SLOT_RETRY: Duration = Duration::from_secs(1);

/// Everything `run` needs, validated.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub database: Database,
    pub slot: String,
    pub publication: String,
    pub producer: ProducerSettings,
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
        let bootstrap_servers = publish.kafka.bootstrap_servers.clone().ok_or_else(|| {
            RelayError::Config("no Kafka to publish to: set KAFKA_BOOTSTRAP_SERVERS (or --bootstrap-servers)".into())
        })?;
        Ok(RelaySettings {
            database: postgres.database()?,
            slot: postgres.slot.clone(),
            publication: postgres.publication.clone(),
            producer: ProducerSettings {
                bootstrap_servers,
                properties: publish.kafka.kafka_properties.clone(),
            },
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

    /// The `outbox.source` of this relay's records: database and slot.
    pub fn source(&self) -> String {
        format!("{}/{}", self.database.dbname(), self.slot)
    }
}

/// Streams until `shutdown` fires (`Ok`) or a definite error (`Err`).
pub async fn run(settings: RelaySettings, shutdown: Shutdown) -> Result<(), RelayError> {
    let producer = Producer::new(&settings.producer).map_err(|e| RelayError::Config(e.to_string()))?;
    let metrics = Metrics::new();
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
        producer: producer.clone(),
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

    let mut relay = Relay::new(settings, producer, metrics, health, confirmed, shutdown.clone());
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
    let producer = Producer::new(&settings.producer).map_err(|e| RelayError::Config(e.to_string()))?;
    let (confirmed, _) = tokio::sync::watch::channel(start);
    let limit = settings.shutdown_timeout;
    let mut relay = Relay::new(settings, producer, metrics, Arc::default(), confirmed, shutdown.clone());
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
                in_flight = relay.pipeline.len(),
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

/// A transaction as the events in flight know it.
#[derive(Debug, Clone, Copy)]
struct TxnRef {
    id: TxnId,
    /// Unix microseconds.
    commit_time: i64,
}

/// Whose record an acknowledgement is for.
#[derive(Debug)]
struct EventTag {
    txn: TxnRef,
    id: String,
    position: SourcePosition,
    topic: TopicId,
    partition: i32,
    dead_letter: bool,
    payload_bytes: u64,
    /// Commit time of the event's transaction, Unix microseconds.
    commit_time: i64,
}

/// The transaction being read: where its events stand and how many it has so far.
#[derive(Debug, Clone, Copy)]
struct OpenTxn {
    id: TxnId,
    commit_lsn: Lsn,
    /// Unix microseconds.
    commit_time: i64,
    next_index: u32,
}

/// Why a session ends: shutdown, or an error whose [class](Classify::class) decides
/// between starting the next session (transient) and ending the run.
enum Interrupt {
    Shutdown,
    /// The source has no more events (a backfill read its last row).
    Ended,
    Failed(RelayError),
}

impl From<RelayError> for Interrupt {
    fn from(error: RelayError) -> Self {
        Interrupt::Failed(error)
    }
}

impl From<StreamError> for Interrupt {
    fn from(error: StreamError) -> Self {
        Interrupt::Failed(error.into())
    }
}

/// How often a wait for the broker to describe a new topic is logged.
const TOPIC_READ_LOG_INTERVAL: Duration = Duration::from_secs(5);

struct Relay {
    settings: RelaySettings,
    pipeline: Pipeline<EventTag>,
    mapper: Mapper,
    fence: Fence,
    /// Set when the first session starts; kept across sessions.
    progress: Option<Progress>,
    /// Records Kafka refused for good, waiting to be dead-lettered (or to halt the relay).
    poisoned: VecDeque<(EventTag, Failure)>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// The confirmed LSN, for the cleaner.
    confirmed: tokio::sync::watch::Sender<Lsn>,
    /// Commit time (Unix microseconds) of the newest transaction read: every transaction
    /// not yet read committed after it (commit order is WAL order).
    last_read_commit_time: Option<i64>,
    /// When the last session ended: every transaction committed before this time
    /// (Unix microseconds) was published, for the message after a lost slot.
    published_before: Option<i64>,
    /// The (system identifier, timeline) of the server the last session streamed from.
    server_identity: Option<(String, String)>,
    /// Ends waits inside a session (a new topic being read) at shutdown.
    shutdown: Shutdown,
}

impl Relay {
    fn new(
        settings: RelaySettings,
        producer: Producer,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        confirmed: tokio::sync::watch::Sender<Lsn>,
        shutdown: Shutdown,
    ) -> Relay {
        let source = settings.source();
        let mut mapper = Mapper::new(settings.template.clone(), settings.columns.clone(), &source);
        if let Some(run) = &settings.replay_run {
            mapper = mapper.replaying(run);
        }
        let exactly_once = settings.delivery == Delivery::ExactlyOnce;
        let fence = Fence::new(producer.clone(), &settings.producer, source, exactly_once);
        Relay {
            settings,
            pipeline: Pipeline::new(producer),
            mapper,
            fence,
            progress: None,
            poisoned: VecDeque::new(),
            metrics,
            health,
            confirmed,
            last_read_commit_time: None,
            published_before: None,
            server_identity: None,
            shutdown,
        }
    }

    /// After a source ended: waits for every acknowledgement, dead-lettering what the
    /// broker refused for good, until nothing is in flight.
    async fn settle_all(&mut self, source: &dyn Confirm, shutdown: &mut Shutdown) -> Result<SourceOutcome, RelayError> {
        loop {
            if !self.poisoned.is_empty() {
                match self.handle_poisoned(source).await {
                    Ok(()) => {}
                    Err(Interrupt::Failed(error)) => return Err(error),
                    Err(_) => return Ok(SourceOutcome::Interrupted),
                }
            }
            if self.pipeline.is_empty() {
                return Ok(SourceOutcome::Finished);
            }
            let ack = tokio::select! {
                biased;
                _ = shutdown.wait() => return Ok(SourceOutcome::Interrupted),
                ack = self.pipeline.next_ack() => ack,
            };
            if let Some(ack) = ack {
                self.settle(ack, Some(source))?;
            }
        }
    }

    async fn run(&mut self, mut shutdown: Shutdown) -> Result<(), RelayError> {
        let mut backoff = Backoff::new(self.settings.reconnect_backoff_max);
        // Until the first session has streamed, failing to reach PostgreSQL is a
        // definite error (a wrong host or port should say so, not retry forever);
        // afterwards it is an outage to ride out.
        let mut streamed_once = false;
        let mut waiting_since: Option<std::time::Instant> = None;
        loop {
            if shutdown.is_triggered() {
                return Ok(());
            }
            let (start, server) = match self.resume_position().await {
                Ok(found) => found,
                Err(error) if retried(&error, streamed_once) => {
                    backoff.wait(&mut shutdown).await;
                    continue;
                }
                Err(error) if error.is_transient() => {
                    return Err(RelayError::Unreachable(format!(
                        "cannot reach PostgreSQL at start: {}",
                        crate::error::chain(&error)
                    )));
                }
                Err(error) => return Err(error),
            };
            let connecting = ReplicationStream::start(
                &self.settings.database,
                server,
                &self.settings.slot,
                &self.settings.publication,
                start,
            );
            let started = tokio::select! {
                biased;
                // Shutdown while connecting: nothing is in flight, nothing to confirm.
                _ = shutdown.wait() => return Ok(()),
                started = connecting => started,
            };
            let mut stream = match started {
                Ok(stream) => stream,
                Err(StreamError::SlotInUse { slot, detail }) => {
                    if self.settings.slot_busy == SlotBusy::Exit {
                        return Err(RelayError::SlotBusy { slot, detail });
                    }
                    self.health.set_standby(true);
                    if waiting_since.is_none() {
                        tracing::info!(%slot, %detail, "waiting for slot: another process holds it; taking over when it is released");
                        waiting_since = Some(std::time::Instant::now());
                    }
                    tokio::select! {
                        biased;
                        _ = shutdown.wait() => return Ok(()),
                        _ = tokio::time::sleep(SLOT_RETRY) => {}
                    }
                    continue;
                }
                Err(error) => {
                    let error = RelayError::from(error);
                    if retried(&error, streamed_once) {
                        backoff.wait(&mut shutdown).await;
                        continue;
                    }
                    return Err(error);
                }
            };
            backoff.reset();
            streamed_once = true;
            self.health.set_streaming(true);
            self.metrics.streaming.set(1);
            if let Some(since) = waiting_since.take() {
                tracing::info!(waited_ms = since.elapsed().as_millis() as u64, "took over the slot");
            }
            let host = self.settings.database.server_label(server);
            tracing::info!(slot = %self.settings.slot, publication = %self.settings.publication, start = %start, server = %host, "streaming");

            let ended = match self.pump(&mut stream, &mut shutdown).await {
                Interrupt::Shutdown => None,
                Interrupt::Ended => {
                    Some(StreamError::transient("the server ended the replication stream".into()).into())
                }
                Interrupt::Failed(error) => Some(error),
            };
            self.health.set_streaming(false);
            self.metrics.streaming.set(0);
            match ended {
                None => {
                    tracing::info!(
                        in_flight = self.pipeline.len(),
                        "shutting down: waiting for acknowledgements"
                    );
                    let confirmed = self.stop_session(stream, self.settings.shutdown_timeout).await;
                    tracing::info!(%confirmed, "stopped");
                    return Ok(());
                }
                Some(error) if error.is_transient() => {
                    let reason = crate::error::chain(&error);
                    tracing::warn!(%reason, in_flight = self.pipeline.len(), "replication session ended; resuming from the last acknowledged position");
                    drop(stream);
                    self.metrics.reconnects.inc();
                    self.metrics.error(error.class().as_str());
                    if self.drain(None, &mut shutdown).await.is_err() {
                        return Ok(());
                    }
                    self.poisoned.clear();
                    if let Some(progress) = self.progress.as_mut() {
                        // The oldest transaction not confirmed, or else any not yet read,
                        // committed after everything published.
                        self.published_before =
                            progress.oldest_unconfirmed_commit_time().or(self.last_read_commit_time);
                        progress.restart_stream();
                    }
                    backoff.wait(&mut shutdown).await;
                }
                Some(error) => {
                    self.metrics.error(error.class().as_str());
                    tracing::error!(error = %crate::error::chain(&error), in_flight = self.pipeline.len(), "stopping");
                    // Confirm what was acknowledged before the failure, nothing after it.
                    self.stop_session(stream, self.settings.shutdown_timeout).await;
                    return Err(error);
                }
            }
        }
    }

    /// Checks the slot and publication, and returns where the next session starts (the
    /// slot's confirmed position, or this process's own if it got further) and on which
    /// server (the one the SQL connection settled on).
    async fn resume_position(&mut self) -> Result<(Lsn, usize), RelayError> {
        let database = &self.settings.database;
        let connected = database.open().await?;
        let (client, server) = (connected.client, connected.server);
        let sql_error = |e: tokio_postgres::Error| RelayError::Connect(database.connect_error(&e));
        let info = slot::inspect(&client, &self.settings.slot).await.map_err(sql_error)?;
        let host = database.server_label(server);
        let in_recovery: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(sql_error)?
            .get(0);
        // A standby's copy of a failover slot cannot be streamed from until the standby is
        // promoted; nor can a missing slot be judged on a standby. Wait for a primary.
        if in_recovery && info.as_ref().is_none_or(|i| i.synced == Some(true)) {
            return Err(StreamError::transient(format!(
                "{host} is a standby (in recovery) without a slot of its own to stream; waiting for a primary (use target_session_attrs=read-write to skip standbys)"
            ))
            .into());
        }
        // Streamed before, and the server reached now has no slot: it was failed over to.
        if info.is_none() && self.progress.is_some() {
            let before = self.published_before.unwrap_or_else(crate::clock::now_micros);
            let time = std::time::UNIX_EPOCH + Duration::from_micros(before.max(0) as u64);
            return Err(RelayError::from(slot::SlotProblem::GoneAfterFailover {
                slot: self.settings.slot.clone(),
                server: host,
                published_before: humantime::format_rfc3339_micros(time).to_string(),
            }));
        }
        let info = slot::check(info, &self.settings.slot, database.dbname()).map_err(RelayError::from)?;
        if !slot::publication_exists(&client, &self.settings.publication)
            .await
            .map_err(sql_error)?
        {
            return Err(RelayError::from(slot::SlotProblem::PublicationMissing {
                publication: self.settings.publication.clone(),
                database: database.dbname().to_owned(),
            }));
        }
        // A mapping that does not fit a table is a configuration error, said before any
        // row of it is read (not a dead letter per row).
        for table in crate::postgres::catalog::publication_tables(&client, &self.settings.publication)
            .await
            .map_err(sql_error)?
        {
            self.settings
                .columns
                .validate(&table.display(), &table.columns, &self.settings.template)
                .map_err(|problem| RelayError::Config(format!("mapping: {problem}")))?;
            if let Some(reason) = crate::backfill::unfinished(&client, &table, &self.settings.slot)
                .await
                .map_err(sql_error)?
            {
                return Err(RelayError::Backfill(reason));
            }
        }
        let slot_position = info.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
        // This process's own confirmed position holds only on the server it was confirmed
        // on. After a failover the new primary's WAL may have diverged below it (a change
        // the old primary sent was never replicated), so resume from the slot's copy
        // there; the fence skips what was already written.
        let identity = slot::server_identity(&client).await.ok();
        let same_server = identity.is_some() && identity == self.server_identity;
        let own = match &self.progress {
            Some(progress) if same_server => progress.confirmed(),
            _ => Lsn::ZERO,
        };
        self.server_identity = identity;
        let start = slot_position.max(own);
        // Nothing is in flight between sessions, so progress can restart from here.
        self.progress = Some(Progress::new(start));
        self.confirmed.send_replace(start);
        Ok((start, server))
    }

    fn progress(&mut self) -> Result<&mut Progress, RelayError> {
        self.progress
            .as_mut()
            .ok_or_else(|| RelayError::Protocol("no session started".into()))
    }

    /// One session's loop, until it is interrupted.
    async fn pump<S: Source>(&mut self, stream: &mut S, shutdown: &mut Shutdown) -> Interrupt {
        match self.pump_until_interrupted(stream, shutdown).await {
            Ok(never) => match never {},
            Err(interrupt) => interrupt,
        }
    }

    async fn pump_until_interrupted<S: Source>(
        &mut self,
        stream: &mut S,
        shutdown: &mut Shutdown,
    ) -> Result<std::convert::Infallible, Interrupt> {
        let mut open: Option<OpenTxn> = None;
        loop {
            if !self.poisoned.is_empty() {
                self.handle_poisoned(stream).await?;
            }
            let has_room = self.pipeline.len() < self.settings.max_in_flight;
            tokio::select! {
                biased;
                // Shutdown first: stop reading at once; the caller drains what is in flight.
                _ = shutdown.wait() => return Err(Interrupt::Shutdown),
                // Acknowledgements before reads: they free the window and move the LSN.
                Some(ack) = self.pipeline.next_ack(), if !self.pipeline.is_empty() => {
                    self.settle(ack, Some(stream))?;
                }
                // Read only while the window has room: this bounds memory, and TCP
                // backpressure then slows the walsender. Cancel-safe.
                event = stream.next(), if has_room => match event? {
                    Some(event) => self.on_event(event, &mut open, stream).await?,
                    None => return Err(Interrupt::Ended),
                },
            }
        }
    }

    async fn on_event(
        &mut self,
        event: StreamEvent,
        open: &mut Option<OpenTxn>,
        stream: &dyn Confirm,
    ) -> Result<(), Interrupt> {
        let message = match event {
            StreamEvent::Keepalive { wal_end } => {
                let moved = self.progress()?.keepalive(wal_end);
                self.after_progress(moved, Some(stream));
                return Ok(());
            }
            StreamEvent::Message(message) => message,
            StreamEvent::Row { insert, index } => {
                let txn = open
                    .as_mut()
                    .ok_or_else(|| RelayError::Protocol("a row outside a transaction".into()))?;
                txn.next_index = index;
                return self.on_insert(&insert, open, stream).await;
            }
        };
        match message {
            Message::Begin(begin) => {
                if open.is_some() {
                    return Err(RelayError::Protocol("Begin inside an open transaction".into()).into());
                }
                let commit_time = crate::clock::from_postgres(begin.commit_time);
                self.last_read_commit_time = Some(commit_time);
                let id = self.progress()?.begin(commit_time);
                *open = Some(OpenTxn {
                    id,
                    commit_lsn: begin.final_lsn,
                    commit_time,
                    next_index: 0,
                });
            }
            Message::Commit(commit) => {
                let txn = open
                    .take()
                    .ok_or_else(|| RelayError::Protocol("Commit without a Begin".into()))?;
                self.metrics.transactions_decoded.inc();
                let moved = self.progress()?.commit(txn.id, commit.end_lsn);
                self.after_progress(moved, Some(stream));
            }
            Message::Relation(relation) => self.mapper.relation(&relation),
            Message::Insert(insert) => self.on_insert(&insert, open, stream).await?,
            // A table-less event, written inside the business transaction.
            Message::Logical(message) if message.transactional && message.prefix == crate::outbox::MESSAGE_PREFIX => {
                let (position, txn) = next_position(open, "outbox message")?;
                let mapped = self
                    .mapper
                    .map_message(&message.content, position)
                    .map_err(|error| DeadLetter::from_mapping(&error, None, Some(message.content.clone())));
                self.publish_mapped(mapped, txn, stream).await?;
            }
            // Our heartbeat: everything before it has been sent, like a keepalive.
            Message::Logical(message) if !message.transactional && message.prefix == crate::monitor::PREFIX => {
                if let Some(trip) = crate::monitor::round_trip(&message.content) {
                    tracing::debug!(round_trip_ms = trip.as_millis() as u64, lsn = %message.lsn, "heartbeat");
                    self.metrics.heartbeat_round_trip_seconds.set(trip.as_secs_f64());
                }
                let moved = self.progress()?.keepalive(message.lsn);
                self.after_progress(moved, Some(stream));
            }
            // Other logical messages, other tables' changes, types and origins carry no events.
            Message::Logical(_)
            | Message::Update { .. }
            | Message::Delete { .. }
            | Message::Truncate { .. }
            | Message::Type(_)
            | Message::Origin(_) => {}
        }
        Ok(())
    }

    async fn on_insert(
        &mut self,
        insert: &crate::postgres::pgoutput::Insert,
        open: &mut Option<OpenTxn>,
        stream: &dyn Confirm,
    ) -> Result<(), Interrupt> {
        let (position, txn) = next_position(open, "Insert")?;
        let mapped = self.mapper.map(insert, position).map_err(|error| {
            let (key, payload) = self.mapper.salvage(insert);
            DeadLetter::from_mapping(&error, key, payload)
        });
        self.publish_mapped(mapped, txn, stream).await
    }

    /// Publishes a mapped event, or dead-letters what could not be mapped.
    async fn publish_mapped(
        &mut self,
        mapped: Result<OutboxEvent, DeadLetter>,
        txn: TxnRef,
        stream: &dyn Confirm,
    ) -> Result<(), Interrupt> {
        match mapped {
            Ok(event) => self.publish(event, txn, stream).await,
            Err(letter) => {
                tracing::warn!(reason = %letter.reason, "outbox event cannot be published");
                self.dead_letter(letter, txn, stream).await
            }
        }
    }

    /// Routes an event (skipping it if an earlier run wrote it) and hands it to Kafka; a
    /// refusal for good dead-letters it.
    async fn publish(&mut self, event: OutboxEvent, txn: TxnRef, stream: &dyn Confirm) -> Result<(), Interrupt> {
        let route = match self.route_unwritten(&event, stream).await? {
            Ok(Some(route)) => route,
            Ok(None) => return Ok(()),
            Err(error) => {
                let letter = DeadLetter::from_event(&event, error.class, error.to_string());
                return self.dead_letter(letter, txn, stream).await;
            }
        };
        match self
            .submit(&event, route.topic, route.partition, txn, false, stream)
            .await?
        {
            None => Ok(()),
            Some(refusal) if refusal.class == ErrorClass::Fatal => {
                Err(DeadLetter::from_event(&event, refusal.class, refusal.reason)
                    .into_halt_error()
                    .into())
            }
            Some(refusal) => {
                let mut letter = DeadLetter::from_event(&event, refusal.class, refusal.reason);
                if refusal.too_large {
                    letter = letter.without_payload();
                }
                self.dead_letter(letter, txn, stream).await
            }
        }
    }

    /// Sends an event that can never be published to the dead-letter topic, or stops the
    /// relay (`--on-poison halt`, or when the dead-letter topic refuses it too).
    async fn dead_letter(&mut self, letter: DeadLetter, txn: TxnRef, stream: &dyn Confirm) -> Result<(), Interrupt> {
        if self.settings.on_poison == OnPoison::Halt {
            return Err(letter.into_halt_error().into());
        }
        tracing::warn!(id = letter.id.as_deref().unwrap_or(""), commit_lsn = %letter.position.commit_lsn, index = letter.position.index, reason = %letter.reason, topic = %self.settings.dead_letter_topic, "dead-lettering event");
        let event = letter
            .clone()
            .into_event(&self.settings.dead_letter_topic, self.fence.source());
        let route = match self.route_unwritten(&event, stream).await? {
            Ok(Some(route)) => route,
            Ok(None) => return Ok(()),
            Err(error) => return Err(dead_letter_refused(letter, &error.to_string()).into()),
        };
        match self
            .submit(&event, route.topic, route.partition, txn, true, stream)
            .await?
        {
            None => {
                self.metrics.events_dead_lettered.inc();
                Ok(())
            }
            Some(refusal) => Err(dead_letter_refused(letter, &refusal.reason).into()),
        }
    }

    /// Routes `event` to its partition; `None` when an earlier run already wrote it there.
    /// A transient failure to read the topic interrupts the session; the inner error is the
    /// broker's refusal of the topic for good, for the caller to judge.
    async fn route_unwritten(
        &mut self,
        event: &OutboxEvent,
        stream: &dyn Confirm,
    ) -> Result<Result<Option<Route>, FenceError>, Interrupt> {
        let route = match self.fence.route(&event.topic, event.routing_key(), event.position) {
            Some(route) => route,
            // Once per topic: read it from the broker, then route.
            None => {
                match self.read_topic(&event.topic, stream).await? {
                    Ok(()) => {}
                    Err(error) if error.is_transient() => return Err(broker_error("exactly-once fence", error)),
                    Err(error) => return Ok(Err(error)),
                }
                self.fence
                    .route(&event.topic, event.routing_key(), event.position)
                    .ok_or_else(|| RelayError::Internal(format!("topic {} was read but is not known", event.topic)))?
            }
        };
        if route.already_written {
            self.metrics.events_skipped_already_written.inc();
            return Ok(Ok(None));
        }
        Ok(Ok(Some(route)))
    }

    /// Reads a topic the relay has not written to yet (its partitions and, for
    /// exactly-once, this source's last records there) without stopping the session:
    /// acknowledgements are settled and keepalives answered while the broker is asked,
    /// and the wait is logged and counted in `topics_being_read`.
    async fn read_topic(&mut self, topic: &str, stream: &dyn Confirm) -> Result<Result<(), FenceError>, Interrupt> {
        let mut reading = self.fence.read_topic(topic);
        let started = std::time::Instant::now();
        let mut report = tokio::time::interval_at(
            tokio::time::Instant::now() + TOPIC_READ_LOG_INTERVAL,
            TOPIC_READ_LOG_INTERVAL,
        );
        self.metrics.topics_being_read.inc();
        let mut shutdown = self.shutdown.clone();
        let outcome = loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break Err(Interrupt::Shutdown),
                read = &mut reading => break Ok(read.unwrap_or_else(|_| Err(FenceError {
                    topic: topic.to_owned(),
                    class: ErrorClass::Transient,
                    reason: "the thread reading the topic ended without an answer".into(),
                }))),
                Some(ack) = self.pipeline.next_ack(), if !self.pipeline.is_empty() => {
                    if let Err(error) = self.settle(ack, Some(stream)) {
                        break Err(error.into());
                    }
                }
                _ = report.tick() => tracing::warn!(topic, waited_ms = started.elapsed().as_millis() as u64, "waiting for the broker to describe a new topic before its first event; reading is paused"),
            }
        };
        self.metrics.topics_being_read.dec();
        let tail = match outcome? {
            Ok(tail) => tail,
            Err(error) => return Ok(Err(error)),
        };
        self.fence.learned(topic, tail);
        tracing::debug!(topic, took_ms = started.elapsed().as_millis() as u64, "topic read");
        Ok(Ok(()))
    }

    /// Hands one record to Kafka, waiting for room in librdkafka's queue if it is full.
    /// Returns the class and reason if Kafka refused it for good before queueing.
    async fn submit(
        &mut self,
        event: &OutboxEvent,
        topic: TopicId,
        partition: i32,
        txn: TxnRef,
        dead_letter: bool,
        stream: &dyn Confirm,
    ) -> Result<Option<Refusal>, Interrupt> {
        loop {
            let tag = EventTag {
                txn,
                id: event.id.clone(),
                position: event.position,
                topic,
                partition,
                dead_letter,
                payload_bytes: event.payload.as_ref().map_or(0, bytes::Bytes::len) as u64,
                commit_time: txn.commit_time,
            };
            match self.pipeline.submit(event, partition, tag) {
                Ok(()) => {
                    self.progress()?.event_sent(txn.id);
                    self.metrics.events_in_flight.set(self.pipeline.len() as i64);
                    return Ok(None);
                }
                Err(SubmitError::QueueFull) => match self.pipeline.next_ack().await {
                    Some(ack) => self.settle(ack, Some(stream))?,
                    None => {
                        return Ok(Some(Refusal {
                            class: ErrorClass::Poison,
                            reason: "the record alone exceeds the producer's queue (queue.buffering.max.kbytes)".into(),
                            too_large: true,
                        }));
                    }
                },
                Err(SubmitError::Refused {
                    class: ErrorClass::Transient,
                    error,
                }) => {
                    return Err(broker_error(&format!("Kafka refused event id={}", event.id), error));
                }
                Err(SubmitError::Refused { class, error }) => {
                    return Ok(Some(Refusal {
                        class,
                        too_large: is_too_large(&error),
                        reason: error.to_string(),
                    }))
                }
            }
        }
    }

    /// Accounts for one acknowledgement. A record refused for good is queued for
    /// [`handle_poisoned`](Self::handle_poisoned); its transaction stays unconfirmed.
    fn settle(&mut self, ack: Acked<EventTag>, stream: Option<&dyn Confirm>) -> Result<(), RelayError> {
        let tag = ack.tag;
        self.metrics.events_in_flight.set(self.pipeline.len() as i64);
        if let Err(failure) = &ack.result {
            self.metrics.error(failure.class.as_str());
        }
        match ack.result {
            Ok(_) => {
                self.fence.written(tag.topic, tag.partition, tag.position);
                self.health.acked();
                if !tag.dead_letter {
                    self.metrics.events_published.inc();
                    self.metrics.bytes_published.inc_by(tag.payload_bytes);
                    let age = crate::clock::now_micros().saturating_sub(tag.commit_time);
                    self.metrics.commit_to_ack_seconds.observe(age.max(0) as f64 / 1e6);
                }
                let moved = self.progress()?.acked(tag.txn.id);
                self.after_progress(moved, stream);
                Ok(())
            }
            Err(failure) if failure.class == ErrorClass::Transient => Err(RelayError::Broker {
                context: format!(
                    "delivery of outbox event id={} at commit LSN {} (index {}) failed",
                    tag.id, tag.position.commit_lsn, tag.position.index
                ),
                class: ErrorClass::Transient,
                source: Box::new(failure.error),
            }),
            Err(failure) if failure.class == ErrorClass::Fatal || tag.dead_letter => {
                let letter =
                    DeadLetter::from_record(None, &tag.id, tag.position, failure.class, failure.error.to_string());
                if tag.dead_letter {
                    Err(dead_letter_refused(letter, &failure.error.to_string()))
                } else {
                    Err(letter.into_halt_error())
                }
            }
            Err(failure) => {
                self.poisoned.push_back((tag, failure));
                Ok(())
            }
        }
    }

    /// Dead-letters records Kafka refused after queueing them, then counts the original
    /// as done, so that its transaction waits for the dead-letter record's acknowledgement.
    async fn handle_poisoned(&mut self, stream: &dyn Confirm) -> Result<(), Interrupt> {
        while let Some((tag, failure)) = self.poisoned.pop_front() {
            let reason = failure.error.to_string();
            let mut letter =
                DeadLetter::from_record(failure.record.as_ref(), &tag.id, tag.position, failure.class, reason);
            if is_too_large(&failure.error) {
                letter = letter.without_payload();
            }
            self.dead_letter(letter, tag.txn, stream).await?;
            let moved = self.progress()?.acked(tag.txn.id);
            self.after_progress(moved, Some(stream));
        }
        Ok(())
    }

    /// Reports a moved confirmed LSN to PostgreSQL and keeps the lag figures current.
    fn after_progress(&self, moved: Option<Lsn>, stream: Option<&dyn Confirm>) {
        if let Some(lsn) = moved {
            if let Some(stream) = stream {
                stream.confirm(lsn);
            }
            self.metrics.confirmed_lsn.set(lsn.0 as i64);
            self.confirmed.send_replace(lsn);
        }
        let oldest = self
            .progress
            .as_ref()
            .and_then(Progress::oldest_unconfirmed_commit_time);
        self.health.set_oldest_unconfirmed_commit(oldest);
    }

    /// Waits for acknowledgements of everything in flight, until `limit` passes or
    /// shutdown fires (`Err`). Failed deliveries are logged; they are never confirmed.
    async fn drain(&mut self, limit: Option<Duration>, shutdown: &mut Shutdown) -> Result<(), ()> {
        let deadline = limit.map(|limit| tokio::time::Instant::now() + limit);
        while !self.pipeline.is_empty() {
            let ack = tokio::select! {
                biased;
                // A second signal (or the first, between sessions) ends the wait.
                _ = shutdown.wait(), if limit.is_none() => return Err(()),
                _ = sleep_until(deadline) => return Err(()),
                ack = self.pipeline.next_ack() => ack,
            };
            let Some(ack) = ack else { break };
            if let Err(error) = self.settle(ack, None) {
                tracing::warn!(error = %crate::error::chain(&error), "event not acknowledged while draining");
            }
        }
        Ok(())
    }

    /// Drains (bounded), reports the final confirmed LSN and ends the stream.
    async fn stop_session(&mut self, stream: ReplicationStream, limit: Duration) -> Lsn {
        let (_never, mut no_shutdown) = crate::shutdown::channel();
        if self.drain(Some(limit), &mut no_shutdown).await.is_err() {
            tracing::warn!(
                in_flight = self.pipeline.len(),
                "shutdown timeout passed with events unacknowledged; they will be sent again on restart"
            );
        }
        let confirmed = self.progress.as_ref().map_or(Lsn::ZERO, Progress::confirmed);
        stream.finish(confirmed, Duration::from_secs(2)).await;
        confirmed
    }
}

/// The source position of the next event of the open transaction.
fn next_position(open: &mut Option<OpenTxn>, what: &str) -> Result<(SourcePosition, TxnRef), RelayError> {
    let txn = open
        .as_mut()
        .ok_or_else(|| RelayError::Protocol(format!("{what} outside a transaction")))?;
    let position = SourcePosition {
        commit_lsn: txn.commit_lsn,
        index: txn.next_index,
    };
    txn.next_index += 1;
    Ok((
        position,
        TxnRef {
            id: txn.id,
            commit_time: txn.commit_time,
        },
    ))
}

/// Kafka refused a record before queueing it.
struct Refusal {
    class: ErrorClass,
    reason: String,
    too_large: bool,
}

/// Whether a session that could not start is tried again (and says so in the log): once
/// the relay has streamed, every transient failure is an outage to ride out, and so is a
/// rejected password, since a rotated secret may reach the server before the relay's
/// password source. Before that, the caller ends the run with the error.
fn retried(error: &RelayError, streamed_once: bool) -> bool {
    if !streamed_once {
        return false;
    }
    let reason = crate::error::chain(error);
    if error.is_authentication_failure() {
        tracing::error!(%reason, "PostgreSQL rejected the password; retrying (a rotated secret may not have reached the password source yet)");
        return true;
    }
    if error.is_transient() {
        tracing::warn!(%reason, "PostgreSQL not reachable; retrying");
        return true;
    }
    false
}

/// A broker failure that interrupts the session, classified as the broker's error is.
fn broker_error<E>(context: &str, error: E) -> Interrupt
where
    E: std::error::Error + Classify + Send + Sync + 'static,
{
    Interrupt::Failed(RelayError::Broker {
        context: context.to_owned(),
        class: error.class(),
        source: Box::new(error),
    })
}

fn dead_letter_refused(letter: DeadLetter, reason: &str) -> RelayError {
    let mut error = letter.into_halt_error();
    if let RelayError::Delivery { reason: text, .. } = &mut error {
        *text = format!("{text}; the dead-letter topic refused it too: {reason}");
    }
    error
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Capped exponential backoff between reconnection attempts.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);

    fn new(max: Duration) -> Self {
        Backoff {
            next: Self::FIRST.min(max),
            max,
        }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST.min(self.max);
    }

    /// Sleeps for the current delay (cut short by shutdown) and doubles it.
    async fn wait(&mut self, shutdown: &mut Shutdown) {
        tokio::select! {
            biased;
            _ = shutdown.wait() => {}
            _ = tokio::time::sleep(self.next) => {}
        }
        self.next = (self.next * 2).min(self.max);
    }
}
