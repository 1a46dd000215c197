//! The session loop: one replication connection at a time, its events through the
//! publisher, outcomes into `progress`, the confirmed position back to the source.
//!
//! Within a session a single biased `select!` reads the source while the window of
//! events in flight has room, and turns broker outcomes into progress. Across sessions the
//! relay keeps what it confirmed: after a lost connection it waits for the events already
//! handed to the broker, then starts the next session at the newest position whose events
//! are all acknowledged. Only this file talks to `progress` and the stream.

use std::sync::Arc;
use std::time::Duration;

use super::backoff::{sleep_until, Backoff};
use super::{RelaySettings, SourceOutcome};
use crate::config::SlotBusy;
use crate::dead_letter::DeadLetter;
use crate::error::{Classify, RelayError};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::outbox::{Mapper, OutboxEvent, SourcePosition};
use crate::postgres::pgoutput::Message;
use crate::postgres::slot;
use crate::postgres::stream::{ReplicationStream, StreamError, StreamEvent};
use crate::progress::{Progress, TxnId};
use crate::publisher::{Note, PoisonPolicy, Publisher};
use crate::readiness::Health;
use crate::shutdown::Shutdown;
use crate::sink::{Acked, AnySink, TxnRef};
use crate::source::{Confirm, Source};

/// How often a standby relay asks for the slot while another process holds it.
const SLOT_RETRY: Duration = Duration::from_secs(1);

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
pub(super) enum Interrupt {
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

/// The relay across sessions: what it read, what it confirmed, and where events go.
pub(super) struct Relay {
    settings: RelaySettings,
    pub(super) publisher: Publisher,
    mapper: Mapper,
    /// Set when the first session starts; kept across sessions.
    pub(super) progress: Option<Progress>,
    pub(super) metrics: Arc<Metrics>,
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
    /// Ends waits inside a session (the broker's queue full, a new topic being read) at
    /// shutdown.
    shutdown: Shutdown,
}

impl Relay {
    pub(super) fn new(
        settings: RelaySettings,
        sink: AnySink,
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
        let policy = PoisonPolicy {
            on_poison: settings.on_poison,
            dead_letter_topic: settings.dead_letter_topic.clone(),
            source,
        };
        let publisher = Publisher::new(sink, policy, Arc::clone(&metrics), Arc::clone(&health));
        Relay {
            settings,
            publisher,
            mapper,
            progress: None,
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
    pub(super) async fn settle_all(
        &mut self,
        source: &dyn Confirm,
        shutdown: &mut Shutdown,
    ) -> Result<SourceOutcome, RelayError> {
        loop {
            if self.publisher.has_poisoned() {
                match self.handle_poisoned(source).await {
                    Ok(()) => {}
                    Err(Interrupt::Failed(error)) => return Err(error),
                    Err(_) => return Ok(SourceOutcome::Interrupted),
                }
            }
            if self.publisher.is_idle() {
                return Ok(SourceOutcome::Finished);
            }
            let ack = tokio::select! {
                biased;
                _ = shutdown.wait() => return Ok(SourceOutcome::Interrupted),
                ack = self.publisher.next_ack() => ack,
            };
            if let Some(ack) = ack {
                self.settle(ack, Some(source))?;
            }
        }
    }

    pub(super) async fn run(&mut self, mut shutdown: Shutdown) -> Result<(), RelayError> {
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
                        in_flight = self.publisher.in_flight(),
                        "shutting down: waiting for acknowledgements"
                    );
                    let confirmed = self.stop_session(stream, self.settings.shutdown_timeout).await;
                    tracing::info!(%confirmed, "stopped");
                    return Ok(());
                }
                Some(error) if error.is_transient() => {
                    let reason = crate::error::chain(&error);
                    tracing::warn!(%reason, in_flight = self.publisher.in_flight(), "replication session ended; resuming from the last acknowledged position");
                    drop(stream);
                    self.metrics.reconnects.inc();
                    self.metrics.error(error.class().as_str());
                    if self.drain(None, &mut shutdown).await.is_err() {
                        return Ok(());
                    }
                    self.publisher.forget_poisoned();
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
                    tracing::error!(error = %crate::error::chain(&error), in_flight = self.publisher.in_flight(), "stopping");
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
    pub(super) async fn pump<S: Source>(&mut self, stream: &mut S, shutdown: &mut Shutdown) -> Interrupt {
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
            if self.publisher.has_poisoned() {
                self.handle_poisoned(stream).await?;
            }
            let has_room = self.publisher.in_flight() < self.settings.max_in_flight;
            tokio::select! {
                biased;
                // Shutdown first: stop reading at once; the caller drains what is in flight.
                _ = shutdown.wait() => return Err(Interrupt::Shutdown),
                // Acknowledgements before reads: they free the window and move the LSN.
                Some(ack) = self.publisher.next_ack(), if !self.publisher.is_idle() => {
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

    /// Hands a mapped event (or its dead letter) to the publisher, and what happened
    /// meanwhile to `progress`.
    async fn publish_mapped(
        &mut self,
        mapped: Result<OutboxEvent, DeadLetter>,
        txn: TxnRef,
        stream: &dyn Confirm,
    ) -> Result<(), Interrupt> {
        let published = tokio::select! {
            biased;
            _ = self.shutdown.wait() => Err(Interrupt::Shutdown),
            published = self.publisher.publish(mapped, txn) => published.map_err(Interrupt::from),
        };
        self.apply_notes(Some(stream))?;
        published
    }

    /// Dead-letters what the broker refused after it was sent (or halts).
    async fn handle_poisoned(&mut self, stream: &dyn Confirm) -> Result<(), Interrupt> {
        let handled = tokio::select! {
            biased;
            _ = self.shutdown.wait() => Err(Interrupt::Shutdown),
            handled = self.publisher.handle_poisoned() => handled.map_err(Interrupt::from),
        };
        self.apply_notes(Some(stream))?;
        handled
    }

    /// Accounts for one outcome from the broker.
    fn settle(&mut self, ack: Acked, stream: Option<&dyn Confirm>) -> Result<(), RelayError> {
        let settled = self.publisher.settle(ack);
        self.apply_notes(stream)?;
        settled
    }

    /// Tells `progress` what the publisher did, in order, and reports a moved position.
    fn apply_notes(&mut self, stream: Option<&dyn Confirm>) -> Result<(), RelayError> {
        let progress = self
            .progress
            .as_mut()
            .ok_or_else(|| RelayError::Protocol("no session started".into()))?;
        let (mut moved, mut acked) = (None, false);
        for note in self.publisher.notes() {
            match note {
                Note::Sent(txn) => progress.event_sent(txn),
                Note::Done(txn) => {
                    acked = true;
                    moved = progress.acked(txn).or(moved);
                }
            }
        }
        // Only an acknowledgement changes what is confirmed or how old the oldest
        // unconfirmed commit is; a submission (most calls) leaves both as they were.
        if acked {
            self.after_progress(moved, stream);
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
    pub(super) async fn drain(&mut self, limit: Option<Duration>, shutdown: &mut Shutdown) -> Result<(), ()> {
        let deadline = limit.map(|limit| tokio::time::Instant::now() + limit);
        while !self.publisher.is_idle() {
            let ack = tokio::select! {
                biased;
                // A second signal (or the first, between sessions) ends the wait.
                _ = shutdown.wait(), if limit.is_none() => return Err(()),
                _ = sleep_until(deadline) => return Err(()),
                ack = self.publisher.next_ack() => ack,
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
                in_flight = self.publisher.in_flight(),
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
