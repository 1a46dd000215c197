//! The heartbeat: every `--heartbeat-interval` the relay writes a non-transactional
//! logical decoding message (`pg_logical_emit_message(false, 'outbox-relay.heartbeat', now)`)
//! and watches for it on its own stream.
//!
//! Why: on a database where the outbox is idle, the heartbeat is WAL of our own that the
//! slot must pass, so its confirmed position keeps up with the server and never pins WAL,
//! whatever the server's keepalive habits. And the time from writing it to reading it back
//! is the replication delay, in seconds, that an operator wants to see.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::postgres::connection::Database;
use crate::shutdown::Shutdown;

/// The prefix of heartbeat messages. Other prefixes are the application's.
pub const PREFIX: &str = "outbox-relay.heartbeat";

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// How long ago the heartbeat with this content was written.
pub fn round_trip(content: &[u8]) -> Option<Duration> {
    let written: i64 = std::str::from_utf8(content).ok()?.parse().ok()?;
    let elapsed = now_micros().checked_sub(written)?;
    u64::try_from(elapsed).ok().map(Duration::from_micros)
}

/// Writes heartbeats until shutdown. Connection problems are logged and retried at the
/// next beat; a refusal for lack of privilege ends the heartbeat with a warning.
pub async fn run(database: Database, interval: Duration, mut shutdown: Shutdown) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut client = None;
    let mut warned = false;
    loop {
        tokio::select! {
            biased;
            // Shutdown ends the heartbeat at once; a beat is never worth waiting for.
            _ = shutdown.wait() => return,
            _ = ticker.tick() => {}
        }
        if client.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
            client = database.connect().await.ok();
        }
        let Some(connection) = client.as_ref() else { continue };
        let sent = connection
            .execute(
                "SELECT pg_logical_emit_message(false, $1, $2)",
                &[&PREFIX, &now_micros().to_string()],
            )
            .await;
        match sent {
            Ok(_) => warned = false,
            Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
                tracing::warn!(%error, "heartbeat disabled: the relay's role may not call pg_logical_emit_message");
                return;
            }
            Err(error) => {
                if !warned {
                    tracing::warn!(error = %database.connect_error(&error), "heartbeat not written; retrying at the next beat");
                    warned = true;
                }
                client = None;
            }
        }
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
