//! The replication slot and the publication, seen through ordinary SQL.
//!
//! The slot is PostgreSQL's durable record of how far the relay has confirmed: the
//! relay keeps no state of its own. `run` never creates a slot, because a new slot starts
//! at the current WAL position and would silently skip every event written since the old
//! one was lost; only `setup` creates it.

use tokio_postgres::Client;

use crate::lsn::Lsn;

/// A row of `pg_replication_slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub name: String,
    pub plugin: Option<String>,
    pub slot_type: String,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub restart_lsn: Option<Lsn>,
    pub confirmed_flush_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    pub safe_wal_size: Option<i64>,
}

/// Why a slot cannot be streamed from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotProblem {
    #[error(
        "replication slot {slot:?} does not exist in database {database:?}; {}",
        SlotProblem::MISSING_FIX
    )]
    Missing { slot: String, database: String },
    #[error("replication slot {slot:?} is not a logical pgoutput slot of database {database:?} (type {slot_type}, plugin {plugin}, database {found_database}); {}", SlotProblem::WRONG_KIND_FIX)]
    WrongKind {
        slot: String,
        database: String,
        slot_type: String,
        plugin: String,
        found_database: String,
    },
    #[error("replication slot {slot:?} was invalidated by PostgreSQL (wal_status = lost, usually max_slot_wal_keep_size): WAL it needed is gone and events may have been lost; {}", SlotProblem::LOST_FIX)]
    Lost { slot: String },
    #[error(
        "publication {publication:?} does not exist in database {database:?}; {}",
        SlotProblem::PUBLICATION_MISSING_FIX
    )]
    PublicationMissing { publication: String, database: String },
}

impl SlotProblem {
    const MISSING_FIX: &'static str = "create it with `outbox-relay setup` (a new slot starts at the current WAL position: events written before it are not published)";
    const WRONG_KIND_FIX: &'static str = "drop it or choose another --slot";
    const LOST_FIX: &'static str =
        "compare the outbox table with the topics, then drop the slot and run `outbox-relay setup` again";
    const PUBLICATION_MISSING_FIX: &'static str =
        "create it with sql/002_publication.sql or `outbox-relay setup --apply-sql`";

    /// What to do about it, for checklists that show the problem and the fix apart.
    pub fn fix(&self) -> &'static str {
        match self {
            SlotProblem::Missing { .. } => Self::MISSING_FIX,
            SlotProblem::WrongKind { .. } => Self::WRONG_KIND_FIX,
            SlotProblem::Lost { .. } => Self::LOST_FIX,
            SlotProblem::PublicationMissing { .. } => Self::PUBLICATION_MISSING_FIX,
        }
    }
}

fn parse_lsn(text: Option<String>) -> Option<Lsn> {
    text.and_then(|t| t.parse().ok())
}

/// Reads the slot's row, or `None` if there is no such slot.
pub async fn inspect(client: &Client, slot: &str) -> Result<Option<SlotInfo>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT slot_name::text, plugin::text, slot_type, database::text, active_pid,
                    restart_lsn::text, confirmed_flush_lsn::text, wal_status, safe_wal_size
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|row| SlotInfo {
        name: row.get(0),
        plugin: row.get(1),
        slot_type: row.get(2),
        database: row.get(3),
        active_pid: row.get(4),
        restart_lsn: parse_lsn(row.get(5)),
        confirmed_flush_lsn: parse_lsn(row.get(6)),
        wal_status: row.get(7),
        safe_wal_size: row.get(8),
    }))
}

/// Checks that `slot` can be streamed from in `database`.
pub fn check(info: Option<SlotInfo>, slot: &str, database: &str) -> Result<SlotInfo, SlotProblem> {
    let info = info.ok_or_else(|| SlotProblem::Missing {
        slot: slot.to_owned(),
        database: database.to_owned(),
    })?;
    let plugin = info.plugin.clone().unwrap_or_default();
    let found_database = info.database.clone().unwrap_or_default();
    if info.slot_type != "logical" || plugin != "pgoutput" || found_database != database {
        return Err(SlotProblem::WrongKind {
            slot: slot.to_owned(),
            database: database.to_owned(),
            slot_type: info.slot_type.clone(),
            plugin,
            found_database,
        });
    }
    if info.wal_status.as_deref() == Some("lost") {
        return Err(SlotProblem::Lost { slot: slot.to_owned() });
    }
    Ok(info)
}

pub async fn publication_exists(client: &Client, publication: &str) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
        .await?;
    Ok(row.is_some())
}

/// Creates a logical slot with the `pgoutput` plugin; returns its starting position.
pub async fn create(client: &Client, slot: &str) -> Result<Lsn, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await?;
    Ok(parse_lsn(row.get(0)).unwrap_or(Lsn::ZERO))
}
