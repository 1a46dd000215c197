//! Steady state: a writer inserts single-row transactions at a fixed rate for a while;
//! outbox-relay (or the polling baseline) publishes them; a consumer measures, per event,
//! the time from the commit (a `clock_timestamp()` taken inside the inserting transaction,
//! in the payload) to its arrival at the consumer. Also the PostgreSQL CPU time spent
//! meanwhile, writer included, and at rate 0 what an idle relay or poller costs the server.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Which design publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publisher {
    /// Nothing publishes: the writer's own cost, to subtract from the others.
    WriterOnly,
    Relay,
    Poller,
}

/// What one steady-state run measured.
pub struct Steady {
    pub publisher: Publisher,
    pub rate: u64,
    pub seconds: f64,
    pub events: u64,
    /// Commit to consumer, microseconds.
    pub latency: Histogram<u64>,
    /// PostgreSQL CPU seconds during the run.
    pub pg_cpu: Option<f64>,
}

impl Steady {
    pub fn markdown(&self) -> String {
        let ms = |q: f64| self.latency.value_at_quantile(q) as f64 / 1000.0;
        let (per_second, per_event) = match self.pg_cpu {
            Some(cpu) => (
                format!("{:.1}", cpu * 1000.0 / self.seconds),
                if self.events > 0 {
                    format!("{:.1}", cpu * 1e6 / self.events as f64)
                } else {
                    "-".to_owned()
                },
            ),
            None => ("n/a".to_owned(), "n/a".to_owned()),
        };
        let latency = if self.events > 0 && !self.latency.is_empty() {
            format!(
                "{:.1} | {:.1} | {:.1} | {:.1}",
                ms(0.5),
                ms(0.99),
                ms(0.999),
                self.latency.max() as f64 / 1000.0
            )
        } else {
            "- | - | - | -".to_owned()
        };
        format!(
            "| {:?} | {} | {:.0} | {} | {latency} | {per_second} | {per_event} |",
            self.publisher, self.rate, self.seconds, self.events
        )
    }
}

pub const HEADER: &str = "| publisher | target events/s | seconds | events | p50 ms | p99 ms | p99.9 ms | max ms | PostgreSQL CPU ms per s | PostgreSQL CPU us/event (writer included) |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

fn now_micros() -> u64 {
    u64::try_from(outbox_relay::monitor::now_micros()).unwrap_or(0)
}

/// Reads `topic` from the beginning until `stop` is set and `expected` events have
/// arrived (or a minute after stop); records each event's commit-to-arrival latency.
pub fn consume(
    bootstrap: String,
    topic: String,
    expected: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    latency: Arc<Mutex<Histogram<u64>>>,
) -> u64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "outbox-bench-steady")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .set("fetch.min.bytes", "1")
        .set("log_level", "3")
        .create()
        .expect("consumer");
    let mut assigned = false;
    let mut received = 0u64;
    let mut stopped_at: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Acquire) {
            let since = *stopped_at.get_or_insert_with(Instant::now);
            if received >= expected.load(Ordering::Acquire) || since.elapsed() > Duration::from_secs(60) {
                return received;
            }
        }
        if !assigned {
            if let Ok(metadata) = consumer.fetch_metadata(Some(&topic), Duration::from_secs(1)) {
                if let Some(found) = metadata
                    .topics()
                    .first()
                    .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                {
                    let mut list = TopicPartitionList::new();
                    for partition in found.partitions() {
                        list.add_partition_offset(&topic, partition.id(), Offset::Beginning)
                            .expect("partition");
                    }
                    consumer.assign(&list).expect("assign");
                    assigned = true;
                }
            }
            if !assigned {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        }
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            let arrived = now_micros();
            let committed = message
                .payload()
                .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                .and_then(|v| v["t"].as_u64());
            if let Some(committed) = committed {
                let _ = latency
                    .lock()
                    .expect("histogram")
                    .record(arrived.saturating_sub(committed).max(1));
            }
            received += 1;
        }
    }
}
