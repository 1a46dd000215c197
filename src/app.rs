//! Wires the parts together: slot → decoder → mapper → Kafka pipeline → progress → slot.
//!
//! One session is one replication connection. Within it a single biased `select!` loop
//! reads the stream while the window of events in flight has room, and turns broker
//! acknowledgements into progress. Across sessions the relay keeps what it confirmed:
//! after a lost connection it waits for the events already handed to Kafka, then starts
//! the next session at the newest position whose events are all acknowledged.

use std::time::Duration;

use crate::config::RunArgs;
use crate::error::RelayError;
use crate::kafka::{Acked, ErrorClass, Pipeline, Producer, ProducerSettings, SubmitError};
use crate::lsn::Lsn;
use crate::outbox::{ColumnNames, Mapper, OutboxEvent, SourcePosition, TopicTemplate};
use crate::postgres::connection::Database;
use crate::postgres::pgoutput::Message;
use crate::postgres::slot;
use crate::postgres::stream::{ReplicationStream, StreamError, StreamEvent};
use crate::progress::{Progress, TxnId};
use crate::shutdown::Shutdown;

/// Everything `run` needs, validated.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub database: Database,
    pub slot: String,
    pub publication: String,
    pub producer: ProducerSettings,
    pub template: TopicTemplate,
    pub max_in_flight: usize,
    pub shutdown_timeout: Duration,
    pub reconnect_backoff_max: Duration,
}

impl RelaySettings {
    pub fn from_args(args: &RunArgs) -> Result<Self, RelayError> {
        Ok(RelaySettings {
            database: Database::parse(&args.postgres.database_url)?,
            slot: args.postgres.slot.clone(),
            publication: args.postgres.publication.clone(),
            producer: ProducerSettings {
                bootstrap_servers: args.kafka.bootstrap_servers.clone(),
                properties: args.kafka.kafka_properties.clone(),
            },
            template: TopicTemplate::parse(&args.kafka.topic_template)
                .map_err(|e| RelayError::Config(e.to_string()))?,
            max_in_flight: args.max_in_flight as usize,
            shutdown_timeout: args.shutdown_timeout,
            reconnect_backoff_max: args.reconnect_backoff_max,
        })
    }
}

/// Streams until `shutdown` fires (`Ok`) or a definite error (`Err`).
pub async fn run(settings: RelaySettings, shutdown: Shutdown) -> Result<(), RelayError> {
    let producer = Producer::new(&settings.producer).map_err(|e| RelayError::Config(e.to_string()))?;
    let mapper = Mapper::new(settings.template.clone(), ColumnNames::default());
    let mut relay = Relay {
        settings,
        pipeline: Pipeline::new(producer),
        mapper,
        progress: None,
    };
    relay.run(shutdown).await
}

/// Whose record an acknowledgement is for.
#[derive(Debug)]
struct EventTag {
    txn: TxnId,
    id: String,
    position: SourcePosition,
}

/// The transaction being read: where its events stand and how many it has so far.
#[derive(Debug, Clone, Copy)]
struct OpenTxn {
    id: TxnId,
    commit_lsn: Lsn,
    next_index: u32,
}

/// How a session ended, when it did not end with a definite error.
enum SessionEnd {
    Shutdown,
    /// Start a new session after a pause (connection lost, server restarting).
    Restart(String),
}

/// Why a session must end.
enum SessionError {
    Restart(String),
    Stop(RelayError),
}

impl From<RelayError> for SessionError {
    fn from(error: RelayError) -> Self {
        SessionError::Stop(error)
    }
}

impl From<StreamError> for SessionError {
    fn from(error: StreamError) -> Self {
        if error.is_transient() {
            SessionError::Restart(error.to_string())
        } else {
            SessionError::Stop(error.into())
        }
    }
}

struct Relay {
    settings: RelaySettings,
    pipeline: Pipeline<EventTag>,
    mapper: Mapper,
    /// Set when the first session starts; kept across sessions.
    progress: Option<Progress>,
}

impl Relay {
    async fn run(&mut self, mut shutdown: Shutdown) -> Result<(), RelayError> {
        let mut backoff = Backoff::new(self.settings.reconnect_backoff_max);
        // Until the first session has streamed, failing to reach PostgreSQL is a
        // definite error (a wrong host or port should say so, not retry forever);
        // afterwards it is an outage to ride out.
        let mut streamed_once = false;
        loop {
            if shutdown.is_triggered() {
                return Ok(());
            }
            let start = match self.resume_position().await {
                Ok(start) => start,
                Err(SessionError::Stop(error)) => return Err(error),
                Err(SessionError::Restart(reason)) if !streamed_once => {
                    return Err(RelayError::Unreachable(format!(
                        "cannot reach PostgreSQL at start: {reason}"
                    )));
                }
                Err(SessionError::Restart(reason)) => {
                    tracing::warn!(%reason, "PostgreSQL not reachable; retrying");
                    backoff.wait(&mut shutdown).await;
                    continue;
                }
            };
            let connecting = ReplicationStream::start(
                &self.settings.database,
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
                Err(error @ StreamError::SlotInUse { .. }) => {
                    tracing::info!(slot = %self.settings.slot, %error, "waiting for slot");
                    backoff.wait(&mut shutdown).await;
                    continue;
                }
                Err(error) if error.is_transient() && !streamed_once => return Err(error.into()),
                Err(error) if error.is_transient() => {
                    tracing::warn!(%error, "cannot start replication; retrying");
                    backoff.wait(&mut shutdown).await;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            backoff.reset();
            streamed_once = true;
            tracing::info!(slot = %self.settings.slot, publication = %self.settings.publication, start = %start, "streaming");

            match self.pump(&mut stream, &mut shutdown).await {
                Ok(SessionEnd::Shutdown) => {
                    tracing::info!(
                        in_flight = self.pipeline.len(),
                        "shutting down: waiting for acknowledgements"
                    );
                    let end = self.stop_session(stream, self.settings.shutdown_timeout).await;
                    return end.map(|confirmed| tracing::info!(%confirmed, "stopped"));
                }
                Ok(SessionEnd::Restart(reason)) | Err(SessionError::Restart(reason)) => {
                    tracing::warn!(%reason, in_flight = self.pipeline.len(), "replication session ended; resuming from the last acknowledged position");
                    drop(stream);
                    if self.drain(None, &mut shutdown).await.is_err() {
                        return Ok(());
                    }
                    if let Some(progress) = self.progress.as_mut() {
                        progress.restart_stream();
                    }
                    backoff.wait(&mut shutdown).await;
                }
                Err(SessionError::Stop(error)) => {
                    tracing::error!(%error, in_flight = self.pipeline.len(), "stopping");
                    // Confirm what was acknowledged before the failure, nothing after it.
                    let _ = self.stop_session(stream, self.settings.shutdown_timeout).await;
                    return Err(error);
                }
            }
        }
    }

    /// Checks the slot and publication, and returns where the next session starts: the
    /// slot's confirmed position, or this process's own if it got further.
    async fn resume_position(&mut self) -> Result<Lsn, SessionError> {
        let database = &self.settings.database;
        let client = database.connect().await.map_err(|error| {
            if error.definite {
                SessionError::Stop(error.into())
            } else {
                SessionError::Restart(error.to_string())
            }
        })?;
        let sql_error = |e: tokio_postgres::Error| SessionError::Restart(database.connect_error(&e).to_string());
        let info = slot::inspect(&client, &self.settings.slot).await.map_err(sql_error)?;
        let info = slot::check(info, &self.settings.slot, database.dbname()).map_err(RelayError::from)?;
        if !slot::publication_exists(&client, &self.settings.publication)
            .await
            .map_err(sql_error)?
        {
            return Err(RelayError::from(slot::SlotProblem::PublicationMissing {
                publication: self.settings.publication.clone(),
                database: database.dbname().to_owned(),
            })
            .into());
        }
        let slot_position = info.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
        let own = self.progress.as_ref().map_or(Lsn::ZERO, Progress::confirmed);
        let start = slot_position.max(own);
        // Nothing is in flight between sessions, so progress can restart from here.
        self.progress = Some(Progress::new(start));
        Ok(start)
    }

    fn progress(&mut self) -> Result<&mut Progress, SessionError> {
        self.progress
            .as_mut()
            .ok_or_else(|| SessionError::Stop(RelayError::Protocol("no session started".into())))
    }

    /// One session's loop.
    async fn pump(
        &mut self,
        stream: &mut ReplicationStream,
        shutdown: &mut Shutdown,
    ) -> Result<SessionEnd, SessionError> {
        let mut open: Option<OpenTxn> = None;
        loop {
            let has_room = self.pipeline.len() < self.settings.max_in_flight;
            tokio::select! {
                biased;
                // Shutdown first: stop reading at once; the caller drains what is in flight.
                _ = shutdown.wait() => return Ok(SessionEnd::Shutdown),
                // Acknowledgements before reads: they free the window and move the LSN.
                Some(ack) = self.pipeline.next_ack(), if !self.pipeline.is_empty() => {
                    self.on_ack(ack, Some(stream))?;
                }
                // Read only while the window has room: this bounds memory, and TCP
                // backpressure then slows the walsender. Cancel-safe.
                event = stream.next(), if has_room => match event? {
                    Some(event) => self.on_event(event, &mut open, stream).await?,
                    None => return Ok(SessionEnd::Restart("the server ended the replication stream".into())),
                },
            }
        }
    }

    async fn on_event(
        &mut self,
        event: StreamEvent,
        open: &mut Option<OpenTxn>,
        stream: &ReplicationStream,
    ) -> Result<(), SessionError> {
        let message = match event {
            StreamEvent::Keepalive { wal_end } => {
                if let Some(lsn) = self.progress()?.keepalive(wal_end) {
                    stream.confirm(lsn);
                }
                return Ok(());
            }
            StreamEvent::Message(message) => message,
        };
        match message {
            Message::Begin(begin) => {
                if open.is_some() {
                    return Err(RelayError::Protocol("Begin inside an open transaction".into()).into());
                }
                let id = self.progress()?.begin();
                *open = Some(OpenTxn {
                    id,
                    commit_lsn: begin.final_lsn,
                    next_index: 0,
                });
            }
            Message::Commit(commit) => {
                let txn = open
                    .take()
                    .ok_or_else(|| RelayError::Protocol("Commit without a Begin".into()))?;
                if let Some(lsn) = self.progress()?.commit(txn.id, commit.end_lsn) {
                    stream.confirm(lsn);
                }
            }
            Message::Relation(relation) => self.mapper.relation(&relation),
            Message::Insert(insert) => {
                let txn = open
                    .as_mut()
                    .ok_or_else(|| RelayError::Protocol("Insert outside a transaction".into()))?;
                let position = SourcePosition {
                    commit_lsn: txn.commit_lsn,
                    index: txn.next_index,
                };
                txn.next_index += 1;
                let txn_id = txn.id;
                let event = self.mapper.map(&insert, position).map_err(RelayError::from)?;
                self.submit(event, txn_id, stream).await?;
            }
            // Logical messages, other tables' changes, types and origins carry no events.
            Message::Logical(_)
            | Message::Update { .. }
            | Message::Delete { .. }
            | Message::Truncate { .. }
            | Message::Type(_)
            | Message::Origin(_) => {}
        }
        Ok(())
    }

    /// Hands one event to Kafka, waiting for room in librdkafka's queue if it is full.
    async fn submit(&mut self, event: OutboxEvent, txn: TxnId, stream: &ReplicationStream) -> Result<(), SessionError> {
        loop {
            let tag = EventTag {
                txn,
                id: event.id.clone(),
                position: event.position,
            };
            match self.pipeline.submit(&event, tag) {
                Ok(()) => {
                    self.progress()?.event_sent(txn);
                    return Ok(());
                }
                Err(SubmitError::QueueFull) => match self.pipeline.next_ack().await {
                    Some(ack) => self.on_ack(ack, Some(stream))?,
                    None => {
                        return Err(delivery_error(
                            &event.id,
                            event.position,
                            ErrorClass::Poison,
                            "the record alone exceeds the producer's queue (queue.buffering.max.kbytes)",
                        )
                        .into());
                    }
                },
                Err(SubmitError::Refused {
                    class: ErrorClass::Transient,
                    error,
                }) => {
                    return Err(SessionError::Restart(format!(
                        "Kafka refused event id={}: {error}",
                        event.id
                    )));
                }
                Err(SubmitError::Refused { class, error }) => {
                    return Err(delivery_error(&event.id, event.position, class, &error.to_string()).into());
                }
            }
        }
    }

    fn on_ack(&mut self, ack: Acked<EventTag>, stream: Option<&ReplicationStream>) -> Result<(), SessionError> {
        match ack.result {
            Ok(_) => {
                if let Some(lsn) = self.progress()?.acked(ack.tag.txn) {
                    if let Some(stream) = stream {
                        stream.confirm(lsn);
                    }
                }
                Ok(())
            }
            Err((ErrorClass::Transient, error)) => Err(SessionError::Restart(format!(
                "delivery of event id={} failed: {error}",
                ack.tag.id
            ))),
            Err((class, error)) => Err(delivery_error(&ack.tag.id, ack.tag.position, class, &error.to_string()).into()),
        }
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
            match self.on_ack(ack, None) {
                Ok(()) => {}
                Err(SessionError::Stop(error)) => tracing::warn!(%error, "event not acknowledged while draining"),
                Err(SessionError::Restart(reason)) => tracing::warn!(%reason, "event not acknowledged while draining"),
            }
        }
        Ok(())
    }

    /// Drains (bounded), reports the final confirmed LSN, ends the stream, and makes
    /// sure the slot has it.
    async fn stop_session(&mut self, stream: ReplicationStream, limit: Duration) -> Result<Lsn, RelayError> {
        let (_never, mut no_shutdown) = crate::shutdown::channel();
        if self.drain(Some(limit), &mut no_shutdown).await.is_err() {
            tracing::warn!(
                in_flight = self.pipeline.len(),
                "shutdown timeout passed with events unacknowledged; they will be sent again on restart"
            );
        }
        let confirmed = self.progress.as_ref().map_or(Lsn::ZERO, Progress::confirmed);
        stream.finish(confirmed, Duration::from_secs(2)).await;
        Ok(confirmed)
    }
}

fn delivery_error(id: &str, position: SourcePosition, class: ErrorClass, reason: &str) -> RelayError {
    RelayError::Delivery {
        id: id.to_owned(),
        commit_lsn: position.commit_lsn,
        index: position.index,
        class,
        reason: reason.to_owned(),
    }
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
