//! `outbox-relay status`: how far behind the relay is, read from PostgreSQL alone, so it
//! works whether the relay runs or not (scripts, cron, on-call).
//!
//! Lag in bytes is the server's WAL position minus the slot's confirmed position. Lag in
//! time is the age of the oldest commit the slot has not confirmed: while no relay holds
//! the slot, it is read by peeking (never consuming) the first transaction after the
//! confirmed position; while a relay holds it, PostgreSQL's own `flush_lag` for that
//! walsender is used.

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::RelayError;
use crate::lsn::Lsn;
use crate::postgres::connection::Database;
use crate::postgres::failover;
use crate::postgres::pgoutput::{self, Message};
use crate::postgres::slot;

/// PostgreSQL's epoch (2000-01-01) in Unix seconds.
const POSTGRES_EPOCH_UNIX_SECONDS: i64 = 946_684_800;

/// Limits for the verdict.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_lag_bytes: u64,
    pub max_lag: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Healthy,
    Lagging,
    AtRisk,
    Lost,
}

impl Verdict {
    /// 0 healthy, 1 lagging, 2 at risk, 3 lost (or no slot).
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Healthy => 0,
            Verdict::Lagging => 1,
            Verdict::AtRisk => 2,
            Verdict::Lost => 3,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub slot: String,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    pub server_wal_lsn: String,
    pub lag_bytes: u64,
    /// `None` when it cannot be told (e.g. nothing was ever decoded).
    pub lag_seconds: Option<f64>,
    pub wal_status: Option<String>,
    pub safe_wal_size: Option<i64>,
    pub publication: String,
    pub publication_tables: Vec<String>,
    /// Failover slot, synchronized standby slots, the standbys' copies.
    pub failover: failover::Readiness,
    /// The same, said in sentences.
    pub failover_findings: Vec<String>,
    pub verdict: Verdict,
    pub reason: String,
}

/// Reads the slot's state and judges it.
pub async fn status(
    database: &Database,
    slot_name: &str,
    publication: &str,
    limits: Limits,
) -> Result<Status, RelayError> {
    let connected = database.open().await?;
    let (client, primary) = (connected.client, connected.server);
    let sql_error = |e: tokio_postgres::Error| RelayError::Connect(database.connect_error(&e));
    let info = slot::inspect(&client, slot_name).await.map_err(sql_error)?;
    let info = match info {
        Some(info) => info,
        None => {
            return Err(slot::SlotProblem::Missing {
                slot: slot_name.to_owned(),
                database: database.dbname().to_owned(),
            }
            .into())
        }
    };
    let server: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(sql_error)?
        .get(0);
    let server_lsn: Lsn = server.parse().unwrap_or_default();
    let confirmed = info.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
    let lag_bytes = server_lsn.bytes_since(confirmed);
    let tables = client
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            &[&publication],
        )
        .await
        .map_err(sql_error)?
        .iter()
        .map(|row| row.get::<_, String>(0))
        .collect();
    let lag_seconds = if info.active_pid.is_some() {
        client
            .query_opt(
                "SELECT extract(epoch FROM flush_lag)::float8 FROM pg_stat_replication WHERE pid = $1",
                &[&info.active_pid],
            )
            .await
            .map_err(sql_error)?
            .and_then(|row| row.get::<_, Option<f64>>(0))
            .or(if lag_bytes == 0 { Some(0.0) } else { None })
    } else if lag_bytes == 0 {
        Some(0.0)
    } else {
        oldest_unconfirmed_commit_age(&client, slot_name, publication, confirmed, server_lsn).await
    };

    let failover = failover::inspect(database, &client, primary, slot_name)
        .await
        .map_err(sql_error)?;
    let (verdict, reason) = judge(&info, lag_bytes, lag_seconds, limits);
    Ok(Status {
        slot: info.name.clone(),
        active: info.active_pid.is_some(),
        active_pid: info.active_pid,
        confirmed_flush_lsn: info.confirmed_flush_lsn.map(|l| l.to_string()),
        restart_lsn: info.restart_lsn.map(|l| l.to_string()),
        server_wal_lsn: server,
        lag_bytes,
        lag_seconds,
        wal_status: info.wal_status.clone(),
        safe_wal_size: info.safe_wal_size,
        publication: publication.to_owned(),
        publication_tables: tables,
        failover_findings: failover
            .findings(slot_name)
            .into_iter()
            .map(|f| format!("{}{}", if f.ok { "" } else { "warning: " }, f.what))
            .collect(),
        failover,
        verdict,
        reason,
    })
}

fn judge(info: &slot::SlotInfo, lag_bytes: u64, lag_seconds: Option<f64>, limits: Limits) -> (Verdict, String) {
    match info.wal_status.as_deref() {
        Some("lost") => {
            return (
                Verdict::Lost,
                "PostgreSQL invalidated the slot (wal_status = lost): events may have been lost".into(),
            )
        }
        Some("unreserved") => {
            return (
                Verdict::AtRisk,
                "the slot retains more WAL than max_slot_wal_keep_size; it will be invalidated at the next checkpoint unless the relay catches up".into(),
            )
        }
        _ => {}
    }
    if let Some(safe) = info.safe_wal_size {
        if safe < 16 * 1024 * 1024 {
            return (
                Verdict::AtRisk,
                format!("only {safe} bytes of WAL left before the slot is invalidated"),
            );
        }
    }
    if lag_bytes > limits.max_lag_bytes {
        return (
            Verdict::Lagging,
            format!("{lag_bytes} bytes behind (limit {})", limits.max_lag_bytes),
        );
    }
    if let Some(seconds) = lag_seconds {
        if seconds > limits.max_lag.as_secs_f64() {
            return (
                Verdict::Lagging,
                format!(
                    "oldest unconfirmed commit is {seconds:.1} s old (limit {:?})",
                    limits.max_lag
                ),
            );
        }
    }
    (Verdict::Healthy, "within limits".into())
}

/// Peeks (without consuming) the first transaction after `confirmed` and returns its age.
/// Reads at most a few MiB of changes; `None` if no commit is found within that window.
async fn oldest_unconfirmed_commit_age(
    client: &Client,
    slot_name: &str,
    publication: &str,
    confirmed: Lsn,
    server: Lsn,
) -> Option<f64> {
    let mut window: u64 = 1 << 20;
    while window <= 64 << 20 {
        let upto = Lsn(confirmed.0.saturating_add(window).min(server.0));
        let rows = client
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, 1,
                    'proto_version', '1', 'publication_names', $3)",
                &[&slot_name, &upto.to_string(), &publication],
            )
            .await
            .ok()?;
        for row in rows {
            let data: Vec<u8> = row.get(0);
            if let Ok(Message::Begin(begin)) = pgoutput::decode(&bytes::Bytes::from(data)) {
                let commit_unix_micros = begin.commit_time + POSTGRES_EPOCH_UNIX_SECONDS * 1_000_000;
                let now_micros = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as i64);
                return Some(((now_micros - commit_unix_micros) as f64 / 1e6).max(0.0));
            }
        }
        if upto >= server {
            return None;
        }
        window *= 4;
    }
    None
}

impl Status {
    /// The human form: one line per fact, then the verdict.
    pub fn render(&self) -> String {
        let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let lag_time = self.lag_seconds.map_or("unknown".into(), |s| format!("{s:.1} s"));
        format!(
            "slot:              {}\n\
             active:            {}\n\
             confirmed LSN:     {}\n\
             restart LSN:       {}\n\
             server WAL LSN:    {}\n\
             lag:               {} bytes, {}\n\
             wal_status:        {}\n\
             safe_wal_size:     {}\n\
             publication:       {} ({})\n\
             failover:          {}\n\
             verdict:           {} ({})\n",
            self.slot,
            self.active_pid
                .map_or("no".into(), |pid| format!("yes, walsender PID {pid}")),
            or_dash(&self.confirmed_flush_lsn),
            or_dash(&self.restart_lsn),
            self.server_wal_lsn,
            self.lag_bytes,
            lag_time,
            or_dash(&self.wal_status),
            self.safe_wal_size.map_or("unlimited".into(), |s| format!("{s} bytes")),
            self.publication,
            if self.publication_tables.is_empty() {
                "no tables".into()
            } else {
                self.publication_tables.join(", ")
            },
            self.failover_findings.join("\n                   "),
            match self.verdict {
                Verdict::Healthy => "healthy",
                Verdict::Lagging => "lagging",
                Verdict::AtRisk => "at risk",
                Verdict::Lost => "lost",
            },
            self.reason,
        )
    }
}
