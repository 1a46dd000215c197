//! What a failover would do to the slot: whether it is failover-enabled, whether
//! PostgreSQL holds back changes no standby has received, and whether the standbys named
//! in the connection target hold a synced copy. `check` and `status` report it.
//!
//! Why it matters. PostgreSQL 17 syncs a failover-enabled slot to standbys running
//! `sync_replication_slots`, so after a promotion the relay resumes from the copy; the
//! exactly-once fence absorbs the replay from the copy's (older) position. Without
//! `synchronized_standby_slots` the relay may publish a change the standby never
//! received: after a failover that change is gone from the database but not from Kafka
//! (a phantom event). Before 17 there is no copy at all.

use serde::Serialize;
use tokio_postgres::Client;

use super::connection::Database;
use super::slot::{self, FAILOVER_SLOTS_SINCE};

/// A standby's copy of the slot, as that standby reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StandbyCopy {
    /// Synced and persistent: usable after a promotion.
    Synced {
        confirmed_flush_lsn: Option<String>,
    },
    /// The standby has no usable copy (yet): missing, or still temporary.
    Missing,
    /// The host is not in recovery: not a standby of this primary.
    NotAStandby,
    Unreachable {
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Standby {
    pub server: String,
    #[serde(flatten)]
    pub copy: StandbyCopy,
}

/// The slot's failover story on the server the relay uses.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub server_major: u32,
    /// `None` before PostgreSQL 17 or when the slot does not exist.
    pub slot_failover: Option<bool>,
    /// `None` before PostgreSQL 17.
    pub synchronized_standby_slots: Option<String>,
    /// The other hosts of the connection target.
    pub standbys: Vec<Standby>,
}

/// A finding, for a checklist: `ok` false is a warning with its fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub ok: bool,
    pub what: String,
    pub fix: Option<String>,
}

/// Reads the primary (`client`, server `primary` of `database`) and every other host.
pub async fn inspect(
    database: &Database,
    client: &Client,
    primary: usize,
    slot_name: &str,
) -> Result<Readiness, tokio_postgres::Error> {
    let server_major = slot::server_major(client).await?;
    let slot_failover = slot::inspect(client, slot_name).await?.and_then(|info| info.failover);
    let synchronized_standby_slots = if server_major >= FAILOVER_SLOTS_SINCE {
        Some(
            client
                .query_one("SELECT current_setting('synchronized_standby_slots')", &[])
                .await?
                .get(0),
        )
    } else {
        None
    };
    let mut standbys = Vec::new();
    for (index, server) in database.servers().iter().enumerate() {
        if index == primary {
            continue;
        }
        let copy = match database.connect_server(index).await {
            Err(error) => StandbyCopy::Unreachable { reason: error.message },
            Ok(standby) => standby_copy(&standby, slot_name)
                .await
                .unwrap_or_else(|error| StandbyCopy::Unreachable {
                    reason: database.connect_error(&error).message,
                }),
        };
        standbys.push(Standby {
            server: server.to_string(),
            copy,
        });
    }
    Ok(Readiness {
        server_major,
        slot_failover,
        synchronized_standby_slots,
        standbys,
    })
}

async fn standby_copy(client: &Client, slot_name: &str) -> Result<StandbyCopy, tokio_postgres::Error> {
    let in_recovery: bool = client.query_one("SELECT pg_is_in_recovery()", &[]).await?.get(0);
    if !in_recovery {
        return Ok(StandbyCopy::NotAStandby);
    }
    Ok(match slot::inspect(client, slot_name).await? {
        Some(info) if info.synced == Some(true) && !info.temporary => StandbyCopy::Synced {
            confirmed_flush_lsn: info.confirmed_flush_lsn.map(|l| l.to_string()),
        },
        _ => StandbyCopy::Missing,
    })
}

/// Where the runbook for servers without failover slots is.
pub const RUNBOOK: &str = "docs/operations.md#failover-without-failover-slots";

impl Readiness {
    /// What an operator should know, one finding per fact.
    pub fn findings(&self, slot_name: &str) -> Vec<Finding> {
        let warn = |what: String, fix: &str| Finding {
            ok: false,
            what,
            fix: Some(fix.to_owned()),
        };
        let pass = |what: String| Finding {
            ok: true,
            what,
            fix: None,
        };
        if self.server_major < FAILOVER_SLOTS_SINCE {
            return vec![warn(
                format!(
                    "PostgreSQL {} has no failover slots: after a failover slot {slot_name} is gone, and `run` stops with exit code 3",
                    self.server_major
                ),
                &format!("upgrade to PostgreSQL 17+ for failover slots, or keep the runbook at hand: {RUNBOOK}"),
            )];
        }
        let mut findings = Vec::new();
        match self.slot_failover {
            Some(true) => findings.push(pass(format!("slot {slot_name} is failover-enabled"))),
            Some(false) => findings.push(warn(
                format!("slot {slot_name} is not failover-enabled: standbys keep no copy of it"),
                "run `outbox-relay setup` while no relay streams from the slot (it enables failover)",
            )),
            None => {}
        }
        match self.synchronized_standby_slots.as_deref() {
            Some("") => findings.push(warn(
                "synchronized_standby_slots is empty: the relay may publish a change no standby has received, which a failover turns into a phantom event".into(),
                "ALTER SYSTEM SET synchronized_standby_slots = '<physical slot of each failover standby>'; SELECT pg_reload_conf();",
            )),
            Some(slots) => findings.push(pass(format!(
                "synchronized_standby_slots = '{slots}': changes reach the relay only after those standbys have them"
            ))),
            None => {}
        }
        for standby in &self.standbys {
            findings.push(match &standby.copy {
                StandbyCopy::Synced { confirmed_flush_lsn } => pass(format!(
                    "standby {} holds a synced copy of slot {slot_name} (confirmed at {})",
                    standby.server,
                    confirmed_flush_lsn.as_deref().unwrap_or("-")
                )),
                StandbyCopy::Missing => warn(
                    format!("standby {} holds no synced copy of slot {slot_name} (yet)", standby.server),
                    "on the standby: sync_replication_slots = on, hot_standby_feedback = on, primary_slot_name set and dbname in primary_conninfo; a new slot is synced once the standby has caught up with it",
                ),
                StandbyCopy::NotAStandby => pass(format!("{} is not a standby (not in recovery)", standby.server)),
                StandbyCopy::Unreachable { reason } => warn(
                    format!("standby {} could not be inspected: {reason}", standby.server),
                    "check that the standby runs and admits the relay's role",
                ),
            });
        }
        findings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readiness(major: u32, failover: Option<bool>, sync: Option<&str>, standbys: Vec<Standby>) -> Readiness {
        Readiness {
            server_major: major,
            slot_failover: failover,
            synchronized_standby_slots: sync.map(str::to_owned),
            standbys,
        }
    }

    #[test]
    fn older_servers_point_to_the_runbook() {
        let findings = readiness(15, None, None, Vec::new()).findings("s");
        assert_eq!(findings.len(), 1);
        assert!(!findings[0].ok);
        assert!(findings[0].fix.as_deref().is_some_and(|f| f.contains(RUNBOOK)));
    }

    #[test]
    fn an_empty_synchronized_standby_slots_warns_of_phantom_events() {
        let standby = Standby {
            server: "db2:5432".into(),
            copy: StandbyCopy::Synced {
                confirmed_flush_lsn: Some("0/10".into()),
            },
        };
        let findings = readiness(18, Some(true), Some(""), vec![standby]).findings("s");
        assert!(findings[0].ok && findings[0].what.contains("failover-enabled"));
        assert!(!findings[1].ok && findings[1].what.contains("phantom"));
        assert!(findings[2].ok && findings[2].what.contains("db2:5432 holds a synced copy"));
        let good = readiness(17, Some(false), Some("standby1"), Vec::new()).findings("s");
        assert!(!good[0].ok && good[1].ok);
    }
}
