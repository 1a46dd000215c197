//! Where the relay's events come from: the replication stream, or a backfill reading the
//! rows a new slot will not stream.
//!
//! The relay loop (`app`) reads events from a [`Source`] and reports back, through
//! [`Confirm`], the newest position whose events are all acknowledged. Both sources go
//! through the same mapping, fence, delivery and progress rule; only where positions come
//! from differs.

use std::future::Future;

use crate::lsn::Lsn;
use crate::postgres::stream::{StreamError, StreamEvent};

/// Receives the position up to which every event is acknowledged (`progress` decides it).
pub trait Confirm: Send + Sync {
    fn confirm(&self, lsn: Lsn);
}

/// A sequence of transactions in commit order.
pub trait Source: Confirm {
    /// The next event; `Ok(None)` when the source has ended. Cancel-safe: dropping the
    /// future loses no event.
    fn next(&mut self) -> impl Future<Output = Result<Option<StreamEvent>, StreamError>> + Send;
}
