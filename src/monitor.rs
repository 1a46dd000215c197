//! The monitor: samples the slot's view of the lag and whether the broker answers, and writes
//! the heartbeat.
//!
//! The heartbeat: every `--heartbeat-interval` the relay writes a non-transactional
//! logical decoding message (`pg_logical_emit_message(false, 'outbox-relay.heartbeat', now)`)
//! and watches for it on its own stream.
//!
//! Why: on a database where the outbox is idle, the heartbeat is WAL of our own that the
//! slot must pass, so its confirmed position keeps up with the server and never pins WAL,
//! whatever the server's keepalive habits. And the time from writing it to reading it back
//! is the replication delay, in seconds, that an operator wants to see.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::clock::now_micros;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::periodic::{Flow, Periodic};
use crate::postgres::connection::Database;
use crate::readiness::Health;
use crate::shutdown::Shutdown;
use crate::sink::Probe;

/// The prefix of heartbeat messages. Other prefixes are the application's.
pub const PREFIX: &str = "outbox-relay.heartbeat";

/// How long ago the heartbeat with this content was written.
pub fn round_trip(content: &[u8]) -> Option<Duration> {
    let written: i64 = std::str::from_utf8(content).ok()?.parse().ok()?;
    let elapsed = now_micros().checked_sub(written)?;
    u64::try_from(elapsed).ok().map(Duration::from_micros)
}

/// How often the slot and the broker are sampled.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// What the monitor needs.
pub struct Monitor {
    pub database: Database,
    pub slot: String,
    pub heartbeat_interval: Duration,
    /// Asks the broker whether it answers.
    pub broker: Probe,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

impl Monitor {
    /// Samples and writes heartbeats until shutdown. Connection problems are logged and
    /// retried at the next tick; a refusal for lack of privilege ends the heartbeat alone.
    pub async fn run(self, shutdown: Shutdown) {
        let tick = if self.heartbeat_interval.is_zero() {
            SAMPLE_INTERVAL
        } else {
            self.heartbeat_interval.min(SAMPLE_INTERVAL)
        };
        let mut task = MonitorTask {
            heartbeat: !self.heartbeat_interval.is_zero(),
            last_beat: None,
            last_sample: None,
            monitor: self,
        };
        let database = task.monitor.database.clone();
        crate::periodic::run(database, "monitor", tick, &mut task, shutdown).await;
    }

    async fn sample_slot(&self, client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
        let row = client
            .query_opt(
                "SELECT pg_current_wal_lsn()::text, confirmed_flush_lsn::text, wal_status, safe_wal_size
                   FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?;
        let Some(row) = row else { return Ok(()) };
        let parse = |text: Option<String>| text.and_then(|t| t.parse::<Lsn>().ok()).unwrap_or_default();
        let server = parse(row.get(0));
        let confirmed = parse(row.get(1));
        self.metrics.server_wal_lsn.set(server.0 as i64);
        self.metrics.lag_bytes.set(server.bytes_since(confirmed) as i64);
        if let Some(status) = row.get::<_, Option<String>>(2) {
            self.metrics.set_wal_status(&status);
        }
        self.metrics
            .slot_safe_wal_size_bytes
            .set(row.get::<_, Option<i64>>(3).unwrap_or(-1));
        Ok(())
    }

    /// Asks the broker whether it answers (bounded).
    async fn sample_broker(&self) {
        let answered = self.broker.answers().await;
        self.health.set_broker_reachable(answered);
        self.metrics.broker_reachable.set(i64::from(answered));
    }
}

/// The monitor's state between ticks.
struct MonitorTask {
    monitor: Monitor,
    /// Off once PostgreSQL refused `pg_logical_emit_message` to the role.
    heartbeat: bool,
    last_beat: Option<Instant>,
    last_sample: Option<Instant>,
}

impl Periodic for MonitorTask {
    async fn tick(&mut self, client: &Client, _shutdown: &mut Shutdown) -> Result<Flow, tokio_postgres::Error> {
        let interval = self.monitor.heartbeat_interval;
        if self.heartbeat && self.last_beat.is_none_or(|at| at.elapsed() >= interval) {
            self.last_beat = Some(Instant::now());
            let sent = client
                .execute(
                    "SELECT pg_logical_emit_message(false, $1, $2)",
                    &[&PREFIX, &now_micros().to_string()],
                )
                .await;
            match sent {
                Ok(_) => {}
                Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
                    tracing::warn!(%error, "heartbeat disabled: the relay's role may not call pg_logical_emit_message");
                    self.heartbeat = false;
                }
                Err(error) => return Err(error),
            }
        }
        if self.last_sample.is_none_or(|at| at.elapsed() >= SAMPLE_INTERVAL) {
            self.last_sample = Some(Instant::now());
            self.monitor.sample_slot(client).await?;
            self.monitor.sample_broker().await;
        }
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_reads_the_written_time() {
        let written = (now_micros() - 1_500_000).to_string();
        let trip = round_trip(written.as_bytes()).unwrap_or_default();
        assert!(trip >= Duration::from_millis(1_500) && trip < Duration::from_secs(60));
        assert_eq!(round_trip(b"not a time"), None);
    }
}
