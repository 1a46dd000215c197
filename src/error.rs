//! The errors that end a relay run, each with its exit code.
//!
//! Transient trouble (a broker outage, a dropped PostgreSQL connection) never reaches
//! this type: the relay waits and retries. What does is *definite*: retrying cannot help
//! until someone changes something, and the message says what.

use crate::kafka::ErrorClass;
use crate::lsn::Lsn;
use crate::outbox::MappingError;
use crate::postgres::connection::{ConnectError, UrlError};
use crate::postgres::slot::SlotProblem;
use crate::postgres::stream::StreamError;

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
    #[error("Kafka refused outbox event id={id} at commit LSN {commit_lsn} (index {index}) with a {} error: {reason}; nothing after it was confirmed", class.as_str())]
    Delivery {
        id: String,
        commit_lsn: Lsn,
        index: u32,
        class: ErrorClass,
        reason: String,
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
}

impl RelayError {
    /// 2: configuration or usage; 3: slot or publication missing or unusable;
    /// 4: a row or record that cannot be published; 5: the slot is held by another
    /// process; 1: anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            RelayError::SlotBusy { .. } => 5,
            RelayError::Config(_) | RelayError::Url(_) => 2,
            RelayError::Slot(_) => 3,
            RelayError::Mapping(_) | RelayError::Delivery { .. } => 4,
            _ => 1,
        }
    }
}
