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
    /// Synced to standbys that run `sync_replication_slots` (PostgreSQL 17+; `None` before).
    pub failover: Option<bool>,
    /// A standby's copy of a primary's failover slot (PostgreSQL 17+; `None` before).
    pub synced: Option<bool>,
    /// Dropped at the end of the session that made it (a standby's copy not yet persisted).
    pub temporary: bool,
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
    /// The relay streamed from the slot, and the server it now reaches has no such slot:
    /// the database failed over to a server the slot was not carried to.
    #[error("replication slot {slot:?} is gone: the relay streamed from it, and the server it reaches now ({server}) has no such slot. The database has failed over to a server the slot was not synced to (PostgreSQL before 17, or a slot without failover). Every event committed before {published_before} was published; later ones may not be; {}", SlotProblem::GONE_FIX)]
    GoneAfterFailover {
        slot: String,
        server: String,
        /// RFC 3339 time before which every committed event was published.
        published_before: String,
    },
}

impl SlotProblem {
    const MISSING_FIX: &'static str = "create it with `outbox-relay setup` (a new slot starts at the current WAL position: events written before it are not published; if this server was promoted from a standby, follow docs/operations.md#failover-without-failover-slots)";
    const GONE_FIX: &'static str =
        "follow docs/operations.md#failover-without-failover-slots: find the last published event, recreate the slot with `outbox-relay setup`, republish what was written in between";
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
            SlotProblem::GoneAfterFailover { .. } => Self::GONE_FIX,
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
            // failover and synced exist from PostgreSQL 17 on: read through jsonb so the
            // same query serves 14 to 18.
            "SELECT slot_name::text, plugin::text, slot_type, database::text, active_pid,
                    restart_lsn::text, confirmed_flush_lsn::text, wal_status, safe_wal_size,
                    (to_jsonb(s) ->> 'failover')::bool, (to_jsonb(s) ->> 'synced')::bool, temporary
               FROM pg_replication_slots s WHERE slot_name = $1",
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
        failover: row.get(9),
        synced: row.get(10),
        temporary: row.get(11),
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

/// Which server this is: its system identifier (kept by standbys of it) and its current
/// timeline (a promotion starts a new one). Equal identities have the same WAL history.
/// Only on a primary (`pg_current_wal_lsn` fails during recovery).
pub async fn server_identity(client: &Client) -> Result<(String, String), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT system_identifier::text, substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)
               FROM pg_control_system()",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// The server's major version (14, 15, ...).
pub async fn server_major(client: &Client) -> Result<u32, tokio_postgres::Error> {
    let number: String = client.query_one("SHOW server_version_num", &[]).await?.get(0);
    Ok(number.parse::<u32>().unwrap_or(0) / 10_000)
}

/// The first major version with failover slots.
pub const FAILOVER_SLOTS_SINCE: u32 = 17;

/// Creates a logical slot with the `pgoutput` plugin, failover-enabled when `failover`
/// is asked and the server has failover slots; returns its starting position and
/// whether it is failover-enabled.
pub async fn create(client: &Client, slot: &str, failover: bool) -> Result<(Lsn, bool), tokio_postgres::Error> {
    let failover = failover && server_major(client).await? >= FAILOVER_SLOTS_SINCE;
    let sql = if failover {
        // (name, plugin, temporary, twophase, failover)
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    let row = client.query_one(sql, &[&slot]).await?;
    Ok((parse_lsn(row.get(0)).unwrap_or(Lsn::ZERO), failover))
}
