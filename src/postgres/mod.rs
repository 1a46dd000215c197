//! Everything that talks to PostgreSQL: connection settings, the replication slot,
//! the walsender stream, and the `pgoutput` decoder.

pub mod connection;
pub mod pgoutput;
pub mod slot;
pub mod stream;
