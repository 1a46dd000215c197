//! What `/readyz` answers: the relay's health as the relay loop, the monitor and the
//! operations endpoint see it, and the policy that turns it into ready or not.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// No acknowledgement for this long while events are in flight: not ready.
const ACK_STALL_MS: u64 = 10_000;

/// What `/readyz` decides from, shared between the relay loop, the monitor and the server.
#[derive(Default)]
pub struct Health {
    streaming: AtomicBool,
    /// A hot standby: another relay holds the slot and this one waits to take over.
    standby: AtomicBool,
    broker_reachable: AtomicBool,
    /// Milliseconds since `started` of the last acknowledgement (0: none yet).
    last_ack_ms: AtomicU64,
    /// Commit time (Unix microseconds) of the oldest unconfirmed transaction; 0: none.
    oldest_unconfirmed_commit: AtomicI64,
    started: std::sync::OnceLock<Instant>,
}

impl Health {
    fn now_ms(&self) -> u64 {
        self.started.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    pub fn set_streaming(&self, streaming: bool) {
        self.streaming.store(streaming, Ordering::Relaxed);
        if streaming {
            self.standby.store(false, Ordering::Relaxed);
        }
    }

    /// Another process holds the slot (`true`), or this relay stopped waiting for it.
    pub fn set_standby(&self, standby: bool) {
        self.standby.store(standby, Ordering::Relaxed);
    }

    pub fn set_broker_reachable(&self, reachable: bool) {
        self.broker_reachable.store(reachable, Ordering::Relaxed);
    }

    pub fn acked(&self) {
        self.last_ack_ms.store(self.now_ms().max(1), Ordering::Relaxed);
    }

    pub fn set_oldest_unconfirmed_commit(&self, unix_micros: Option<i64>) {
        self.oldest_unconfirmed_commit
            .store(unix_micros.unwrap_or(0), Ordering::Relaxed);
    }

    /// Age of the oldest commit read but not yet confirmed; 0 when there is none.
    pub fn lag_seconds(&self) -> f64 {
        let oldest = self.oldest_unconfirmed_commit.load(Ordering::Relaxed);
        if oldest == 0 {
            return 0.0;
        }
        let now = crate::clock::now_micros();
        (now.saturating_sub(oldest) as f64 / 1e6).max(0.0)
    }

    /// `Ok` with what the relay is doing when ready (streaming, or a hot standby whose
    /// PostgreSQL and the broker answer, so that an orchestrator rolling the relays out sees
    /// both up); otherwise why not.
    pub fn readiness(&self, metrics: &Metrics, max_lag: Duration) -> Result<&'static str, String> {
        if !self.streaming.load(Ordering::Relaxed) {
            if self.standby.load(Ordering::Relaxed) && self.broker_reachable.load(Ordering::Relaxed) {
                return Ok("hot standby: another relay holds the slot");
            }
            return Err("not streaming (PostgreSQL unreachable, or starting)".into());
        }
        if !self.broker_reachable.load(Ordering::Relaxed) {
            return Err("the broker does not answer".into());
        }
        let in_flight = metrics.events_in_flight.get();
        let since_ack = self.now_ms().saturating_sub(self.last_ack_ms.load(Ordering::Relaxed));
        if in_flight > 0 && since_ack > ACK_STALL_MS {
            return Err(format!(
                "{in_flight} events in flight and no acknowledgement for {since_ack} ms"
            ));
        }
        let lag = self.lag_seconds();
        if lag > max_lag.as_secs_f64() {
            return Err(format!("lag {lag:.1} s exceeds {max_lag:?}"));
        }
        Ok("streaming")
    }
}
