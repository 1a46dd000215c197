//! The walsender stream: `START_REPLICATION SLOT ... LOGICAL` over the replication
//! protocol, through the `pgwire-replication` crate (see docs/adr/0001).
//!
//! One job: deliver the slot's messages in order as [`StreamEvent`]s and carry the
//! confirmed LSN back. The position it reports is only ever the one `progress` gave to
//! [`ReplicationStream::confirm`]; before that, the position the session started at.
//! Standby status updates go out at most every second while the confirmed LSN moves,
//! every second while idle (well inside `wal_sender_timeout`), and whenever the server
//! asks for one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{FeedbackObserver, PgWireError, ReplicationClient, ReplicationEvent};
use tokio::sync::Notify;

use super::connection::Database;
use super::pgoutput::{self, Begin, Commit, DecodeError, LogicalMessage, Message};
use crate::lsn::Lsn;

/// How often a changed confirmed LSN is reported, and the longest silence while idle.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    Message(Message),
    /// The server has sent everything before `wal_end`.
    Keepalive {
        wal_end: Lsn,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Another process streams from the slot (a second relay, or a dying session).
    #[error("replication slot {slot:?} is in use by another process: {detail}")]
    SlotInUse { slot: String, detail: String },
    /// The connection failed or the server is restarting: reconnect and resume.
    #[error("replication connection: {0}")]
    Transient(String),
    /// The server refused in a way reconnecting will not fix.
    #[error("replication refused by PostgreSQL: {0}")]
    Definite(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl StreamError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StreamError::Transient(_) | StreamError::SlotInUse { .. })
    }

    fn from_pgwire(error: PgWireError, slot: &str) -> Self {
        let text = error.to_string();
        let sqlstate = text
            .split("SQLSTATE ")
            .nth(1)
            .map(|rest| rest.chars().take(5).collect::<String>())
            .unwrap_or_default();
        match error {
            PgWireError::Io(_) | PgWireError::Task(_) => StreamError::Transient(text),
            PgWireError::Server(_) if sqlstate == "55006" => StreamError::SlotInUse {
                slot: slot.to_owned(),
                detail: text,
            },
            // 57P0x: server shutting down or starting up; 08xxx: connection failure;
            // 53300: too many connections. All pass.
            PgWireError::Server(_)
                if sqlstate.starts_with("57P") || sqlstate.starts_with("08") || sqlstate == "53300" =>
            {
                StreamError::Transient(text)
            }
            _ => StreamError::Definite(text),
        }
    }
}

pub struct ReplicationStream {
    client: ReplicationClient,
    slot: String,
    feedback_sent: Arc<AtomicU64>,
    feedback_notify: Arc<Notify>,
}

impl ReplicationStream {
    /// Starts streaming `slot` from `start`, which must not be after the slot's confirmed
    /// position plus what this process has itself confirmed. Returns once the server has
    /// accepted `START_REPLICATION` and the slot is held by this session.
    pub async fn start(database: &Database, slot: &str, publication: &str, start: Lsn) -> Result<Self, StreamError> {
        let feedback_sent = Arc::new(AtomicU64::new(0));
        let feedback_notify = Arc::new(Notify::new());
        let observer = {
            let sent = Arc::clone(&feedback_sent);
            let notify = Arc::clone(&feedback_notify);
            FeedbackObserver::new(move |_| {
                sent.fetch_add(1, Ordering::Release);
                notify.notify_waiters();
            })
        };
        let config = database
            .replication_config(slot, publication)
            .with_start_lsn(start.into())
            .with_ack_lsn(start.into())
            .with_status_interval(STATUS_INTERVAL)
            .with_wakeup_interval(STATUS_INTERVAL)
            .with_feedback_observer(observer);
        let error = |e| StreamError::from_pgwire(e, slot);
        let mut client = ReplicationClient::connect(config).await.map_err(error)?;
        client.wait_started().await.map_err(error)?;
        Ok(ReplicationStream {
            client,
            slot: slot.to_owned(),
            feedback_sent,
            feedback_notify,
        })
    }

    /// The next event; `Ok(None)` when the server ended the stream.
    /// Cancel-safe: dropping the future loses no event.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>, StreamError> {
        let event = match self.client.recv().await {
            Ok(Some(event)) => event,
            Ok(None) => return Ok(None),
            Err(error) => return Err(StreamError::from_pgwire(error, &self.slot)),
        };
        let event = match event {
            ReplicationEvent::XLogData { data, .. } => StreamEvent::Message(pgoutput::decode(&data)?),
            ReplicationEvent::KeepAlive { wal_end, .. } => StreamEvent::Keepalive {
                wal_end: wal_end.into(),
            },
            // pgwire-replication decodes transaction boundaries and logical messages
            // itself; they are handed on as the same messages our decoder produces.
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => StreamEvent::Message(Message::Begin(Begin {
                final_lsn: final_lsn.into(),
                commit_time: commit_time_micros,
                xid,
            })),
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => StreamEvent::Message(Message::Commit(Commit {
                flags: 0,
                commit_lsn: lsn.into(),
                end_lsn: end_lsn.into(),
                commit_time: commit_time_micros,
            })),
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => StreamEvent::Message(Message::Logical(LogicalMessage {
                transactional,
                lsn: lsn.into(),
                prefix,
                content,
            })),
            ReplicationEvent::StoppedAt { reached } => StreamEvent::Keepalive {
                wal_end: reached.into(),
            },
        };
        Ok(Some(event))
    }

    /// Reports `lsn` as flushed at the next status update. Only `progress` decides it.
    pub fn confirm(&self, lsn: Lsn) {
        self.client.update_applied_lsn(lsn.into());
    }

    /// Reports `lsn`, waits (at most `wait`) for a status update carrying it, then ends
    /// the stream cleanly with CopyDone.
    pub async fn finish(mut self, lsn: Lsn, wait: Duration) {
        let before = self.feedback_sent.load(Ordering::Acquire);
        let notified = self.feedback_notify.notified();
        self.confirm(lsn);
        if self.feedback_sent.load(Ordering::Acquire) == before {
            let _ = tokio::time::timeout(wait, notified).await;
        }
        if let Err(error) = tokio::time::timeout(wait, self.client.shutdown()).await {
            tracing::debug!(%error, "replication stream did not end in time");
            self.client.abort();
        }
    }
}
