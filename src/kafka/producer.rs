//! The Kafka producer: librdkafka with the settings our guarantees rely on.
//!
//! - `enable.idempotence=true` and `acks=all`: an acknowledged record is on every
//!   in-sync replica, and retries neither duplicate nor reorder records in a partition.
//! - `message.timeout.ms=0` (no timeout): librdkafka retries a record through any broker
//!   outage, with its capped backoff, instead of failing it after five minutes. A
//!   delivery report therefore only ever carries a poison or fatal error by default.
//! - Partitions are chosen by the relay (`kafka::partitioner`, murmur2 as Kafka's Java
//!   client), so consumers and Kafka Streams apps co-partition as they expect;
//!   `partitioner=murmur2_random` is set too, for any record sent without one.
//!
//! Users may set any other librdkafka property; the ones above cannot be weakened.

use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};

use crate::kafka::client_log::LogContext;
use crate::outbox::OutboxEvent;

/// What the user said about Kafka.
#[derive(Debug, Clone)]
pub struct ProducerSettings {
    pub bootstrap_servers: String,
    /// Passed to librdkafka as they are (TLS, SASL, compression, linger, ...).
    pub properties: Vec<(String, String)>,
}

/// A property the relay's guarantees depend on was set to a weaker value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProducerConfigError {
    #[error(
        "Kafka property {key}={value} is not allowed: outbox-relay needs {key}={required} for its delivery guarantees"
    )]
    Weakened {
        key: String,
        value: String,
        required: String,
    },
    #[error("cannot create the Kafka producer: {0}")]
    Client(String),
}

/// Properties that must keep these values (aliases included).
const REQUIRED: [(&str, &str); 4] = [
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("request.required.acks", "all"),
    ("max.in.flight.requests.per.connection", "5"),
];

/// Defaults chosen for the relay, which users may override.
const DEFAULTS: [(&str, &str); 5] = [
    ("message.timeout.ms", "0"),
    // Fewer, larger produce requests. Measured at 5k single-row transactions/s for 40 s on
    // the local broker (docs/performance.md): commit-to-consumer p99 352 ms with
    // librdkafka's 5 ms (the broker saturated on small requests), 88 ms with 10 ms, 41 ms
    // with 20 ms; at 1k/s p99 27 ms with 20 ms. ADR 0004.
    ("linger.ms", "20"),
    ("partitioner", "murmur2_random"),
    // Bounds the producer's own buffer; a full buffer pauses reading from PostgreSQL.
    ("queue.buffering.max.kbytes", "65536"),
    ("client.id", "outbox-relay"),
];

#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer<LogContext>,
}

impl Producer {
    pub fn new(settings: &ProducerSettings) -> Result<Self, ProducerConfigError> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &settings.bootstrap_servers);
        for (key, value) in DEFAULTS {
            config.set(key, value);
        }
        for (key, value) in &settings.properties {
            if let Some((_, required)) = REQUIRED.iter().find(|(name, _)| name == key) {
                let equivalent = *required == "all" && (value == "-1" || value == "all");
                let lower_in_flight = *key == "max.in.flight.requests.per.connection"
                    && value.parse::<u32>().is_ok_and(|n| (1..=5).contains(&n));
                if value != required && !equivalent && !lower_in_flight {
                    return Err(ProducerConfigError::Weakened {
                        key: key.clone(),
                        value: value.clone(),
                        required: (*required).to_owned(),
                    });
                }
            }
            config.set(key, value);
        }
        config.set("enable.idempotence", "true");
        config.set("acks", "all");
        let inner = config
            .create_with_context(LogContext::default())
            .map_err(|e: KafkaError| ProducerConfigError::Client(e.to_string()))?;
        Ok(Producer { inner })
    }

    /// The librdkafka client, for metadata.
    pub fn inner(&self) -> &FutureProducer<LogContext> {
        &self.inner
    }

    /// Hands one record for `partition` to librdkafka. Returns at once; the future
    /// resolves when the broker acknowledged the record or it failed for good.
    pub fn send(&self, event: &OutboxEvent, partition: i32) -> Result<DeliveryFuture, KafkaError> {
        self.send_parts(
            &event.topic,
            partition,
            &event.key,
            event.payload.as_deref(),
            &event.headers,
        )
    }

    pub fn send_parts(
        &self,
        topic: &str,
        partition: i32,
        key: &[u8],
        payload: Option<&[u8]>,
        headers: &[(crate::outbox::HeaderName, Option<Bytes>)],
    ) -> Result<DeliveryFuture, KafkaError> {
        let mut kafka_headers = OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in headers {
            kafka_headers = kafka_headers.insert(Header {
                key: name.as_ref(),
                value: value.as_deref(),
            });
        }
        let mut record = FutureRecord::to(topic)
            .partition(partition)
            .key(key)
            .headers(kafka_headers);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        self.inner.send_result(record).map_err(|(error, _record)| error)
    }

    /// Waits (bounded) for librdkafka to deliver what it holds.
    pub fn flush(&self, timeout: std::time::Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout)
    }
}
