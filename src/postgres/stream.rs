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

use super::connection::{first_accepted, requires_tls, Database, INVALID_PASSWORD, REQUIRES_TLS_HINT};
use super::pgoutput::{self, Begin, Commit, DecodeError, Insert, LogicalMessage, Message};
use super::tls::explain_certificate_failure;
use crate::error::{io_class, sqlstate_class, Classify, ErrorClass};
use crate::lsn::Lsn;

/// How often a changed confirmed LSN is reported, and the longest silence while idle.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Added to `connect_timeout` for the whole start of a replication session (connect,
/// TLS, authentication, START_REPLICATION).
const CONNECT_GRACE: Duration = Duration::from_secs(20);

/// What to do when the walsender refuses the role (SQLSTATE 42501).
pub const REPLICATION_PRIVILEGE_FIX: &str = "the role needs the REPLICATION attribute to stream the slot: as a superuser, ALTER ROLE <role> REPLICATION (on Amazon RDS/Aurora: GRANT rds_replication TO <role>)";

/// What a replication connection says of its server (see [`ReplicationStream::probe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub system_id: String,
    pub timeline: u32,
    /// The TLS version, `None` for plain text.
    pub tls: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    Message(Message),
    /// The server has sent everything before `wal_end`.
    Keepalive {
        wal_end: Lsn,
    },
    /// A row read by SQL rather than from the WAL (a backfill), with its place in its
    /// transaction: it keeps that place, and so its source position, on every run.
    Row {
        insert: Insert,
        index: u32,
    },
}

/// A slot just created, and the session that holds the snapshot it exported (valid until
/// this is dropped).
pub struct ExportedSnapshot {
    /// The name to give `SET TRANSACTION SNAPSHOT`.
    pub snapshot: String,
    /// Where the slot starts: every transaction committed before it is in the snapshot,
    /// every later one is streamed.
    pub consistent_point: Lsn,
    _session: ReplicationClient,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Another process streams from the slot (a second relay, or a dying session).
    #[error("replication slot {slot:?} is in use by another process: {detail}")]
    SlotInUse { slot: String, detail: String },
    /// The connection failed, the server is restarting, or it refused; `class` says
    /// whether reconnecting can help ([`crate::error::sqlstate_class`]).
    #[error("replication connection: {message}")]
    Failed {
        message: String,
        class: ErrorClass,
        sqlstate: Option<String>,
    },
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl Classify for StreamError {
    fn class(&self) -> ErrorClass {
        match self {
            StreamError::SlotInUse { .. } => ErrorClass::Transient,
            StreamError::Failed { class, .. } => *class,
            StreamError::Decode(_) => ErrorClass::Fatal,
        }
    }
}

impl StreamError {
    /// PostgreSQL rejected the password (SQLSTATE 28P01).
    pub fn is_authentication_failure(&self) -> bool {
        self.sqlstate() == Some(INVALID_PASSWORD)
    }

    /// The SQLSTATE of PostgreSQL's answer, when it gave one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            StreamError::Failed { sqlstate, .. } => sqlstate.as_deref(),
            StreamError::SlotInUse { .. } => Some("55006"),
            StreamError::Decode(_) => None,
        }
    }

    pub(crate) fn transient(message: String) -> Self {
        StreamError::Failed {
            message,
            class: ErrorClass::Transient,
            sqlstate: None,
        }
    }

    pub(crate) fn fatal(message: String) -> Self {
        StreamError::Failed {
            message,
            class: ErrorClass::Fatal,
            sqlstate: None,
        }
    }

    /// A failed SQL statement of a source that reads by SQL (a backfill), classified as
    /// the connection classified it.
    pub fn from_connect(error: super::connection::ConnectError, context: &str) -> Self {
        StreamError::Failed {
            message: format!("{context}: {}", error.message),
            class: error.class,
            sqlstate: error.sqlstate,
        }
    }

    /// A server's error message, classified by the SQLSTATE it quotes.
    pub fn from_server_text(text: &str) -> Self {
        let sqlstate = crate::error::sqlstate_in(text).map(str::to_owned);
        StreamError::Failed {
            message: text.to_owned(),
            class: sqlstate.as_deref().map_or(ErrorClass::Fatal, sqlstate_class),
            sqlstate,
        }
    }

    fn from_pgwire(error: PgWireError, slot: &str) -> Self {
        let text = error.to_string();
        if let Some(explained) = explain_certificate_failure(&text) {
            return StreamError::fatal(format!("TLS: {explained}"));
        }
        if requires_tls(&text) {
            return StreamError::fatal(format!("{text}; {REQUIRES_TLS_HINT}"));
        }
        match error {
            PgWireError::Io(io) => StreamError::Failed {
                class: io_class(io.kind()),
                message: text,
                sqlstate: None,
            },
            // The client's worker ended with the connection.
            PgWireError::Task(_) => StreamError::transient(text),
            PgWireError::Server(_) | PgWireError::Auth(_) => match StreamError::from_server_text(&text) {
                StreamError::Failed {
                    sqlstate: Some(code), ..
                } if code == "55006" => StreamError::SlotInUse {
                    slot: slot.to_owned(),
                    detail: text,
                },
                StreamError::Failed {
                    message,
                    class,
                    sqlstate: Some(code),
                } if code == "42501" => StreamError::Failed {
                    message: format!("{message}; {}", REPLICATION_PRIVILEGE_FIX),
                    class,
                    sqlstate: Some(code),
                },
                failed => failed,
            },
            _ => StreamError::fatal(text),
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
    /// Starts streaming `slot` from `start` on server `server` of `database` (the one
    /// the session's SQL connection settled on). `start` must not be after the slot's
    /// confirmed position plus what this process has itself confirmed. Returns once the
    /// server has accepted `START_REPLICATION` and the slot is held by this session.
    pub async fn start(
        database: &Database,
        server: usize,
        slot: &str,
        publication: &str,
        start: Lsn,
    ) -> Result<Self, StreamError> {
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
        let attempts = database
            .replication_attempts(server, slot, publication)
            .map_err(|e| StreamError::fatal(e.message))?;
        let timeout = database.connect_timeout();
        let client = first_accepted(
            attempts,
            |config| {
                let config = config
                    .with_start_lsn(start.into())
                    .with_ack_lsn(start.into())
                    .with_status_interval(STATUS_INTERVAL)
                    .with_wakeup_interval(STATUS_INTERVAL)
                    .with_feedback_observer(observer.clone());
                Self::connect(config, timeout, slot)
            },
            refused_plain,
        )
        .await
        .unwrap_or_else(no_attempt)?;
        Ok(ReplicationStream {
            client,
            slot: slot.to_owned(),
            feedback_sent,
            feedback_notify,
        })
    }

    async fn connect(
        config: pgwire_replication::ReplicationConfig,
        timeout: Option<Duration>,
        slot: &str,
    ) -> Result<ReplicationClient, StreamError> {
        let error = |e| StreamError::from_pgwire(e, slot);
        let connecting = async {
            let mut client = ReplicationClient::connect(config).await.map_err(error)?;
            client.wait_started().await.map_err(error)?;
            Ok(client)
        };
        // Connecting, TLS, authentication and START_REPLICATION together; the slot's
        // decoding context is ready at once for an existing slot.
        match timeout {
            Some(limit) => tokio::time::timeout(limit + CONNECT_GRACE, connecting)
                .await
                .unwrap_or_else(|_| {
                    Err(StreamError::transient(format!(
                        "no answer within {:?} while connecting for replication",
                        limit + CONNECT_GRACE
                    )))
                }),
            None => connecting.await,
        }
    }

    /// Opens a replication connection to server `server` without starting replication,
    /// as `run` would connect, and reports what the server says of itself. `check` uses
    /// it to prove the replication connection works (TLS, authentication, REPLICATION).
    pub async fn probe(database: &Database, server: usize) -> Result<Probe, StreamError> {
        let (mut client, system) = gated_session(database, server).await?;
        let error = |e| StreamError::from_pgwire(e, "");
        let rows = client
            .simple_query("SELECT ssl::text, coalesce(version, '') FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .await
            .map_err(error)?;
        let text = |row: &pgwire_replication::QueryRow, i: usize| {
            row.get(i)
                .and_then(Option::as_ref)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let tls = rows
            .first()
            .filter(|row| text(row, 0) == "true")
            .map(|row| text(row, 1));
        Ok(Probe {
            system_id: system.system_id,
            timeline: system.timeline,
            tls,
        })
    }

    /// Makes an existing slot failover-enabled (PostgreSQL 17+), with the replication
    /// command that does it; the slot must not be in use.
    pub async fn enable_failover(database: &Database, server: usize, slot: &str) -> Result<(), StreamError> {
        let (mut client, _) = gated_session(database, server).await?;
        client
            .simple_query(&format!("ALTER_REPLICATION_SLOT {slot} ( FAILOVER true )"))
            .await
            .map(|_| ())
            .map_err(|e| StreamError::from_pgwire(e, slot))
    }

    /// Creates logical slot `slot` (pgoutput) on a replication session and keeps that
    /// session open, so that the snapshot the slot exported stays importable: a
    /// transaction that imports it (`SET TRANSACTION SNAPSHOT`) sees exactly the rows
    /// committed before the slot's first streamed change. Failover-enabled when `failover`
    /// (PostgreSQL 17+).
    pub async fn create_slot_with_snapshot(
        database: &Database,
        server: usize,
        slot: &str,
        failover: bool,
        major: u32,
    ) -> Result<ExportedSnapshot, StreamError> {
        let (mut client, _) = gated_session(database, server).await?;
        // The parenthesized options exist from PostgreSQL 15; 14 has only the keyword.
        let command = match (major >= 15, failover) {
            (true, true) => {
                format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER true)")
            }
            (true, false) => format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT 'export')"),
            (false, _) => format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput EXPORT_SNAPSHOT"),
        };
        let rows = client
            .simple_query(&command)
            .await
            .map_err(|e| StreamError::from_pgwire(e, slot))?;
        let text = |index: usize| {
            rows.first()
                .and_then(|row| row.get(index).cloned().flatten())
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .ok_or_else(|| StreamError::fatal(format!("CREATE_REPLICATION_SLOT answered without column {index}")))
        };
        let consistent_point = text(1)?
            .parse::<Lsn>()
            .map_err(|e| StreamError::fatal(format!("CREATE_REPLICATION_SLOT answered a bad position: {e}")))?;
        Ok(ExportedSnapshot {
            snapshot: text(2)?,
            consistent_point,
            _session: client,
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

/// An authenticated replication session to server `server` that has not started
/// streaming, and its IDENTIFY_SYSTEM answer (which surfaces connection errors).
/// `sslmode=allow` tries plain text, then TLS.
async fn gated_session(
    database: &Database,
    server: usize,
) -> Result<(ReplicationClient, pgwire_replication::IdentifySystem), StreamError> {
    let attempts = database
        .replication_attempts(server, "outbox_relay", "outbox_relay")
        .map_err(|e| StreamError::fatal(e.message))?;
    let limit = database
        .connect_timeout()
        .map_or(Duration::from_secs(60), |t| t + CONNECT_GRACE);
    first_accepted(
        attempts,
        |config| async move {
            let error = |e| StreamError::from_pgwire(e, "");
            let opening = async {
                let mut client = ReplicationClient::connect_gated(config).await.map_err(error)?;
                let system = client.identify_system().await.map_err(error)?;
                Ok((client, system))
            };
            tokio::time::timeout(limit, opening)
                .await
                .unwrap_or_else(|_| Err(StreamError::transient(format!("no answer within {limit:?}"))))
        },
        refused_plain,
    )
    .await
    .unwrap_or_else(no_attempt)
}

/// How attempts end when there were none to make.
fn no_attempt<T>() -> Result<T, StreamError> {
    Err(StreamError::fatal("no replication connection was attempted".into()))
}

/// A replication attempt refused because the server requires TLS (`sslmode=allow`).
fn refused_plain(error: &StreamError) -> bool {
    requires_tls(&error.to_string())
}

impl crate::source::Confirm for ReplicationStream {
    fn confirm(&self, lsn: Lsn) {
        ReplicationStream::confirm(self, lsn);
    }
}

impl crate::source::Source for ReplicationStream {
    fn next(&mut self) -> impl std::future::Future<Output = Result<Option<StreamEvent>, StreamError>> + Send {
        ReplicationStream::next(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(text: &str) -> StreamError {
        StreamError::from_pgwire(PgWireError::Server(text.into()), "outbox_relay")
    }

    #[test]
    fn a_slot_held_elsewhere_is_waited_for() {
        let error = server("replication slot \"outbox_relay\" is active for PID 42 (SQLSTATE 55006)");
        assert!(matches!(&error, StreamError::SlotInUse { slot, .. } if slot == "outbox_relay"));
        assert!(error.is_transient());
    }

    #[test]
    fn a_server_shutting_down_or_a_dropped_connection_is_transient() {
        for text in [
            "terminating connection due to administrator command (SQLSTATE 57P01)",
            "the database system is starting up (SQLSTATE 57P03)",
            "sorry, too many clients already (SQLSTATE 53300)",
        ] {
            assert!(server(text).is_transient(), "{text}");
        }
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer");
        let error = StreamError::from_pgwire(PgWireError::Io(Arc::new(reset)), "outbox_relay");
        assert!(error.is_transient());
        assert!(StreamError::from_pgwire(PgWireError::Task("worker ended".into()), "s").is_transient());
    }

    #[test]
    fn a_role_without_replication_is_fatal_and_says_how_to_fix_it() {
        let error = server("permission denied to start WAL sender (SQLSTATE 42501)");
        assert_eq!(error.class(), ErrorClass::Fatal);
        assert_eq!(error.sqlstate(), Some("42501"));
        assert!(error.to_string().contains("ALTER ROLE"), "{error}");
    }

    #[test]
    fn refusals_without_a_known_cause_are_fatal() {
        assert!(!server("replication slot \"x\" does not exist (SQLSTATE 42704)").is_transient());
        assert!(!server("something without a code").is_transient());
        let auth = StreamError::from_pgwire(
            PgWireError::Auth("password authentication failed for user \"relay\" (SQLSTATE 28P01)".into()),
            "s",
        );
        assert_eq!(auth.class(), ErrorClass::Fatal);
        assert!(auth.is_authentication_failure());
    }
}
