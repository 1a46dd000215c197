//! Everything that talks to PostgreSQL: the connection target (`target`, read from the
//! URL and libpq's environment by `conninfo`, with `password` sources, `secret`s and
//! `tls`), the connections built from it (`connection`), the replication slot, the
//! walsender stream, and the `pgoutput` decoder.

pub mod catalog;
pub mod connection;
pub mod conninfo;
pub mod failover;
pub mod password;
pub mod pgoutput;
pub mod secret;
pub mod slot;
pub mod stream;
pub mod target;
pub mod tls;
