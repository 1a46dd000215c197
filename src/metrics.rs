//! What the relay counts and measures, in one Prometheus registry.
//!
//! Names start with `outbox_relay_`. LSNs are exported as numbers (bytes into the WAL),
//! so `server_wal_lsn - confirmed_lsn` can be graphed; `lag_bytes` is that difference as the
//! slot sees it (sampled from `pg_replication_slots`), `lag_seconds` the age of the oldest
//! commit the relay has read but not yet confirmed.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::sink::SinkKind;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    pub events_published: Counter,
    pub bytes_published: Counter,
    pub events_dead_lettered: Counter,
    pub events_skipped_already_written: Counter,
    pub errors: Family<Labels, Counter>,
    pub events_in_flight: Gauge,
    pub transactions_decoded: Counter,
    pub confirmed_lsn: Gauge,
    pub server_wal_lsn: Gauge,
    pub lag_bytes: Gauge,
    pub lag_seconds: Gauge<f64, AtomicU64>,
    pub heartbeat_round_trip_seconds: Gauge<f64, AtomicU64>,
    pub commit_to_ack_seconds: Histogram,
    pub reconnects: Counter,
    pub topics_being_read: Gauge,
    pub slot_wal_status: Family<Labels, Gauge>,
    pub slot_safe_wal_size_bytes: Gauge,
    pub streaming: Gauge,
    pub broker_reachable: Gauge,
    pub rows_cleaned: Counter,
    pub cleanup_passes: Counter,
}

impl Metrics {
    /// Metrics of a relay publishing to `sink`: the broker-facing ones carry the label
    /// `sink="<kind>"`, so dashboards and alerts can tell relays of different brokers apart.
    pub fn new(sink: SinkKind) -> Arc<Self> {
        let mut registry = Registry::with_prefix("outbox_relay");
        let metrics = Metrics {
            events_published: Counter::default(),
            bytes_published: Counter::default(),
            events_dead_lettered: Counter::default(),
            events_skipped_already_written: Counter::default(),
            errors: Family::default(),
            events_in_flight: Gauge::default(),
            transactions_decoded: Counter::default(),
            confirmed_lsn: Gauge::default(),
            server_wal_lsn: Gauge::default(),
            lag_bytes: Gauge::default(),
            lag_seconds: Gauge::default(),
            heartbeat_round_trip_seconds: Gauge::default(),
            commit_to_ack_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            reconnects: Counter::default(),
            topics_being_read: Gauge::default(),
            slot_wal_status: Family::default(),
            slot_safe_wal_size_bytes: Gauge::default(),
            streaming: Gauge::default(),
            broker_reachable: Gauge::default(),
            rows_cleaned: Counter::default(),
            cleanup_passes: Counter::default(),
            registry: Registry::default(),
        };
        let m = &metrics;
        let broker = registry.sub_registry_with_label(("sink".into(), sink.as_str().into()));
        broker.register(
            "events_published",
            "Events acknowledged by the broker",
            m.events_published.clone(),
        );
        broker.register(
            "bytes_published",
            "Payload bytes acknowledged by the broker",
            m.bytes_published.clone(),
        );
        broker.register(
            "events_dead_lettered",
            "Events sent to the dead-letter destination",
            m.events_dead_lettered.clone(),
        );
        broker.register(
            "events_skipped_already_written",
            "Replayed events skipped because an earlier run wrote them (exactly-once)",
            m.events_skipped_already_written.clone(),
        );
        broker.register("errors", "Errors by class (transient, poison, fatal)", m.errors.clone());
        broker.register(
            "events_in_flight",
            "Events handed to the broker, not yet acknowledged",
            m.events_in_flight.clone(),
        );
        broker.register(
            "commit_to_ack_seconds",
            "From an event's commit in PostgreSQL to its acknowledgement by the broker",
            m.commit_to_ack_seconds.clone(),
        );
        broker.register(
            "broker_reachable",
            "1 while the broker answers (Kafka: metadata requests; RabbitMQ: an open connection)",
            m.broker_reachable.clone(),
        );
        registry.register(
            "transactions_decoded",
            "Transactions read from the slot",
            m.transactions_decoded.clone(),
        );
        registry.register(
            "confirmed_lsn",
            "LSN confirmed to PostgreSQL, as bytes into the WAL",
            m.confirmed_lsn.clone(),
        );
        registry.register(
            "server_wal_lsn",
            "Server's current WAL position, as bytes",
            m.server_wal_lsn.clone(),
        );
        registry.register(
            "lag_bytes",
            "Server WAL position minus the slot's confirmed position",
            m.lag_bytes.clone(),
        );
        registry.register(
            "lag_seconds",
            "Age of the oldest commit read but not yet confirmed",
            m.lag_seconds.clone(),
        );
        registry.register(
            "heartbeat_round_trip_seconds",
            "From writing the last heartbeat to reading it back from the slot",
            m.heartbeat_round_trip_seconds.clone(),
        );
        registry.register(
            "reconnects",
            "Replication sessions restarted after a failure",
            m.reconnects.clone(),
        );
        registry.register(
            "topics_being_read",
            "New topics whose partitions the relay is reading before their first event (exactly-once fence); reading waits while this is above 0",
            m.topics_being_read.clone(),
        );
        registry.register(
            "slot_wal_status",
            "1 for the slot's current wal_status (reserved, extended, unreserved, lost)",
            m.slot_wal_status.clone(),
        );
        registry.register(
            "slot_safe_wal_size_bytes",
            "WAL that can still be written before the slot is invalidated (-1: no limit)",
            m.slot_safe_wal_size_bytes.clone(),
        );
        registry.register(
            "streaming",
            "1 while a replication session streams",
            m.streaming.clone(),
        );
        registry.register(
            "rows_cleaned",
            "Outbox rows deleted by --retention cleanup",
            m.rows_cleaned.clone(),
        );
        registry.register(
            "cleanup_passes",
            "Cleanup passes: a mark taken, and rows deleted if an old enough mark is confirmed",
            m.cleanup_passes.clone(),
        );
        // Every error class is exported from the start (at 0), so rates and alerts see a
        // series before the first error, not "no data".
        for class in ["transient", "poison", "fatal"] {
            m.errors
                .get_or_create(&vec![("class".to_owned(), class.to_owned())])
                .inc_by(0);
        }
        Arc::new(Metrics { registry, ..metrics })
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    pub fn error(&self, class: &str) {
        self.errors
            .get_or_create(&vec![("class".to_owned(), class.to_owned())])
            .inc();
    }

    pub fn set_wal_status(&self, status: &str) {
        for known in ["reserved", "extended", "unreserved", "lost"] {
            let value = i64::from(known == status);
            self.slot_wal_status
                .get_or_create(&vec![("status".to_owned(), known.to_owned())])
                .set(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_even_before_its_first_sample_broker_ones_labelled_by_sink() {
        let metrics = Metrics::new(SinkKind::Kafka);
        metrics.set_wal_status("reserved");
        let text = metrics.encode();
        for line in [
            "outbox_relay_errors_total{sink=\"kafka\",class=\"poison\"} 0",
            "outbox_relay_errors_total{sink=\"kafka\",class=\"transient\"} 0",
            "outbox_relay_errors_total{sink=\"kafka\",class=\"fatal\"} 0",
            "outbox_relay_slot_wal_status{status=\"reserved\"} 1",
            "outbox_relay_events_published_total{sink=\"kafka\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }
}
