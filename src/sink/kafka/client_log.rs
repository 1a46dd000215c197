//! librdkafka's log lines and global errors, through `tracing`, without floods.
//!
//! While a broker is down librdkafka reports the same failure many times a second (each
//! connection attempt, each metadata request). The relay retries by itself and shows the
//! outage on `/readyz` and in the metrics, so one line per kind of failure per
//! [`REPEAT_AFTER`] is enough; repeats are counted and the count goes with the next line.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// The shortest time between two lines about the same kind of failure.
pub const REPEAT_AFTER: Duration = Duration::from_secs(30);

/// The context of the relay's Kafka clients: routes librdkafka's reports to `tracing`, deduplicated.
#[derive(Default)]
pub struct LogContext {
    repeats: Mutex<Repeats>,
}

/// When each kind of report was last written and how many were held back since.
#[derive(Debug, Default)]
struct Repeats {
    kinds: HashMap<String, (Instant, u64)>,
}

impl Repeats {
    /// `Some(held back)` when a report of `kind` should be written at `now`.
    fn admit(&mut self, kind: &str, now: Instant) -> Option<u64> {
        match self.kinds.get_mut(kind) {
            Some((last, held)) if now.duration_since(*last) < REPEAT_AFTER => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                // The kinds are librdkafka's facilities and error codes: a small set.
                self.kinds.insert(kind.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

impl LogContext {
    fn admit(&self, kind: &str) -> Option<u64> {
        let mut repeats = self.repeats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        repeats.admit(kind, Instant::now())
    }
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if matches!(level, RDKafkaLogLevel::Debug) {
            tracing::debug!(target: "librdkafka", facility, "{message}");
            return;
        }
        let Some(held_back) = self.admit(&format!("log:{facility}")) else {
            return;
        };
        match level {
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, held_back, "{message}");
            }
            // librdkafka's error lines are about connections it retries by itself.
            _ => tracing::warn!(target: "librdkafka", facility, held_back, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        let Some(held_back) = self.admit(&format!("error:{code:?}")) else {
            return;
        };
        if code == Some(RDKafkaErrorCode::Fatal) {
            tracing::error!(target: "librdkafka", %error, held_back, "{reason}");
        } else {
            tracing::warn!(target: "librdkafka", %error, held_back, "Kafka client: {reason} (retrying)");
        }
    }
}

/// The fence's reader uses the same reporting.
impl rdkafka::consumer::ConsumerContext for LogContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_held_back_and_counted() {
        let mut repeats = Repeats::default();
        let start = Instant::now();
        assert_eq!(repeats.admit("error:AllBrokersDown", start), Some(0));
        for i in 1..=100 {
            assert_eq!(
                repeats.admit("error:AllBrokersDown", start + Duration::from_millis(50 * i)),
                None
            );
        }
        assert_eq!(repeats.admit("log:FAIL", start), Some(0), "another kind is written");
        assert_eq!(repeats.admit("error:AllBrokersDown", start + REPEAT_AFTER), Some(100));
    }
}
