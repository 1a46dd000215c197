//! The one rule for "retry or give up", and the errors that end a relay run.
//!
//! Every failure the relay meets is put in one of three classes ([`ErrorClass`]): a
//! *transient* one (an outage, a dropped connection, a server restarting) is waited out
//! and retried; a *poison* one concerns one event only, which is dead-lettered; a *fatal*
//! one cannot be fixed by waiting, so the relay stops and the message says what to change.
//! Each error type answers [`Classify::class`], and the tables that decide it for
//! PostgreSQL (SQLSTATE, I/O errors) are here, tested in one place; each broker's codes are in
//! its sink (`sink/kafka/errors.rs`, `sink/rabbitmq.rs`). The session loop asks only `class()`: transient ends the session and
//! starts another, anything else ends the run with [`RelayError::exit_code`].

use std::io::ErrorKind;

use crate::lsn::Lsn;
use crate::outbox::MappingError;
use crate::postgres::connection::{ConnectError, UrlError};
use crate::postgres::slot::SlotProblem;
use crate::postgres::stream::StreamError;

/// What a failure means for the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The service or the network will recover: wait, then retry.
    Transient,
    /// This one record can never be written (too large, not authorised for its topic):
    /// dead-letter it, or halt under `--on-poison halt`.
    Poison,
    /// Waiting will not help until someone changes something: stop with a message.
    Fatal,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Poison => "poison",
            ErrorClass::Fatal => "fatal",
        }
    }
}

/// An error that knows whether retrying can help.
pub trait Classify {
    fn class(&self) -> ErrorClass;

    fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Transient
    }
}

/// PostgreSQL's answer, by SQLSTATE. Transient: the connection or the server is in
/// trouble that passes (class 08 connection, 53 resources such as too many connections,
/// 57P01-57P03 shutting down or starting up, 55006 object in use such as a slot still held
/// by a dying session, 40001/40P01 serialization and deadlock, 55P03 lock not available,
/// 57014 a cancelled statement, 58xxx I/O trouble, 25006 a read-only server (a standby
/// before promotion)). Anything else was refused for a reason: authentication (28),
/// privileges (42501), a missing database (3D000), a dropped database (57P04) and every
/// SQLSTATE not listed are fatal, so that the relay says so instead of retrying forever.
pub fn sqlstate_class(code: &str) -> ErrorClass {
    let transient = code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("58")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "55006" | "40001" | "40P01" | "55P03" | "57014" | "25006"
        );
    if transient {
        ErrorClass::Transient
    } else {
        ErrorClass::Fatal
    }
}

/// An I/O error on a connection: the network's troubles pass; a refused certificate or
/// a file the relay may not read does not.
pub fn io_class(kind: ErrorKind) -> ErrorClass {
    match kind {
        ErrorKind::InvalidData | ErrorKind::InvalidInput | ErrorKind::PermissionDenied | ErrorKind::Unsupported => {
            ErrorClass::Fatal
        }
        _ => ErrorClass::Transient,
    }
}

/// The SQLSTATE in a server message rendered as "... (SQLSTATE 42501)" or
/// "... SQLSTATE 42501 ...".
pub fn sqlstate_in(text: &str) -> Option<&str> {
    let rest = text.split("SQLSTATE ").nth(1)?;
    let code = rest.get(..5)?;
    code.chars().all(|c| c.is_ascii_alphanumeric()).then_some(code)
}

/// Whether SQLSTATE `code` says the relay's role was refused: a password or
/// authentication method (class 28) or a privilege (42501, such as a role without
/// REPLICATION). Such runs end with exit code 6.
pub fn is_access_refused(code: &str) -> bool {
    code.starts_with("28") || code == "42501"
}

/// `error` and every cause under it, as one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // `#[error(transparent)]` and messages that quote their cause repeat it.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Slot(#[from] SlotProblem),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Mapping(#[from] MappingError),
    #[error("the broker refused outbox event id={id} at commit LSN {commit_lsn} (index {index}) with a {} error: {reason}; nothing after it was confirmed", class.as_str())]
    Delivery {
        id: String,
        commit_lsn: Lsn,
        index: u32,
        class: ErrorClass,
        reason: String,
    },
    /// The broker could not be used for a while (a delivery failed, a topic's partitions
    /// could not be read, the connection was lost); the class says whether to retry.
    #[error("{context}: {source}")]
    Broker {
        context: String,
        class: ErrorClass,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Unreachable(String),
    /// The relay's own task ended abnormally (a bug); reported, not a panic.
    #[error("{0}")]
    Internal(String),
    #[error("replication slot {slot:?} is held by another process and --slot-busy=exit: {detail}")]
    SlotBusy { slot: String, detail: String },
    /// A backfill that cannot start (another slot of that name, an unusable table).
    #[error("backfill: {0}")]
    Backfill(String),
    /// A replay selected no row.
    #[error("{0}")]
    NothingToReplay(String),
    /// Stopped by a signal before the work was done; running the command again resumes.
    #[error("{0}")]
    Interrupted(String),
}

impl Classify for RelayError {
    fn class(&self) -> ErrorClass {
        match self {
            RelayError::Connect(error) => error.class(),
            RelayError::Stream(error) => error.class(),
            RelayError::Delivery { class, .. } | RelayError::Broker { class, .. } => *class,
            RelayError::Config(_)
            | RelayError::Url(_)
            | RelayError::Slot(_)
            | RelayError::Mapping(_)
            | RelayError::Protocol(_)
            | RelayError::Unreachable(_)
            | RelayError::Internal(_)
            | RelayError::SlotBusy { .. }
            | RelayError::Backfill(_)
            | RelayError::NothingToReplay(_) => ErrorClass::Fatal,
            RelayError::Interrupted(_) => ErrorClass::Transient,
        }
    }
}

impl RelayError {
    /// PostgreSQL rejected the password (SQLSTATE 28P01), on either kind of connection.
    pub fn is_authentication_failure(&self) -> bool {
        match self {
            RelayError::Connect(error) => error.is_authentication_failure(),
            RelayError::Stream(error) => error.is_authentication_failure(),
            _ => false,
        }
    }

    /// 2: configuration or usage; 3: slot or publication missing or unusable (or a
    /// backfill that cannot use them);
    /// 4: a row or record that cannot be published; 5: the slot is held by another
    /// process; 6: PostgreSQL refused the relay's role (password, or a privilege such as
    /// REPLICATION); 1: anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            RelayError::SlotBusy { .. } => 5,
            RelayError::Config(_) | RelayError::Url(_) => 2,
            RelayError::Slot(_) | RelayError::Backfill(_) => 3,
            RelayError::Mapping(_) | RelayError::Delivery { .. } => 4,
            RelayError::Connect(error) if error.sqlstate.as_deref().is_some_and(is_access_refused) => 6,
            RelayError::Stream(error) if error.sqlstate().is_some_and(is_access_refused) => 6,
            _ => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_of_passing_trouble_are_transient() {
        for code in [
            "08006", // connection failure
            "08001", "53300", // too many connections
            "53100", // disk full
            "57P01", // admin shutdown
            "57P02", // crash shutdown
            "57P03", // cannot connect now (starting up, recovery)
            "55006", // object in use: a slot held by a dying session
            "40001", "40P01", "55P03", "57014", "58030", "25006",
        ] {
            assert_eq!(sqlstate_class(code), ErrorClass::Transient, "{code}");
        }
    }

    #[test]
    fn sqlstates_of_refusals_are_fatal() {
        for code in [
            "28P01", // wrong password
            "28000", // no pg_hba.conf entry
            "42501", // insufficient privilege (REPLICATION, SELECT)
            "3D000", // no such database
            "57P04", // database dropped
            "42P01", // undefined table
            "42601", // syntax error
            "XX000", // internal error: not known to pass
            "22023", // unknown: refused for a reason
        ] {
            assert_eq!(sqlstate_class(code), ErrorClass::Fatal, "{code}");
        }
    }

    #[test]
    fn network_io_errors_are_transient_and_certificates_are_not() {
        for kind in [
            ErrorKind::ConnectionRefused,
            ErrorKind::ConnectionReset,
            ErrorKind::ConnectionAborted,
            ErrorKind::BrokenPipe,
            ErrorKind::TimedOut,
            ErrorKind::UnexpectedEof,
            ErrorKind::NotConnected,
            ErrorKind::Other,
        ] {
            assert_eq!(io_class(kind), ErrorClass::Transient, "{kind:?}");
        }
        for kind in [ErrorKind::InvalidData, ErrorKind::PermissionDenied] {
            assert_eq!(io_class(kind), ErrorClass::Fatal, "{kind:?}");
        }
    }

    #[test]
    fn sqlstate_is_found_in_server_messages() {
        assert_eq!(
            sqlstate_in("server error: permission denied to start WAL sender (SQLSTATE 42501)"),
            Some("42501")
        );
        assert_eq!(sqlstate_in("db error: SQLSTATE 57P01 terminating"), Some("57P01"));
        assert_eq!(sqlstate_in("io error: connection reset"), None);
        assert_eq!(sqlstate_in("SQLSTATE 4"), None);
    }

    #[test]
    fn a_refused_role_has_its_own_exit_code() {
        let refused = |code: &str| ConnectError {
            target: "postgresql://relay@db/app".into(),
            message: format!("refused (SQLSTATE {code})"),
            class: sqlstate_class(code),
            sqlstate: Some(code.into()),
        };
        assert_eq!(RelayError::Connect(refused("42501")).exit_code(), 6);
        assert_eq!(RelayError::Connect(refused("28P01")).exit_code(), 6);
        assert_eq!(RelayError::Connect(refused("3D000")).exit_code(), 1);
        let stream = StreamError::from_server_text("permission denied to start WAL sender (SQLSTATE 42501)");
        assert_eq!(stream.class(), ErrorClass::Fatal);
        assert_eq!(RelayError::Stream(stream).exit_code(), 6);
    }

    #[test]
    fn the_chain_names_every_cause_once() {
        let io = std::io::Error::new(ErrorKind::ConnectionReset, "connection reset by peer");
        let error = RelayError::Broker {
            context: "reading partitions of topic orders".into(),
            class: ErrorClass::Transient,
            source: Box::new(io),
        };
        assert_eq!(
            chain(&error),
            "reading partitions of topic orders: connection reset by peer"
        );
        assert!(error.is_transient());
    }
}
