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
//!
//! Delivery reports are served by a thread of our own ([`PollThread`]) rather than by
//! rdkafka's `FutureProducer`, whose thread polls in 100 ms slices and spins through the
//! last millisecond of each (its deadline rounds the remaining time down to a 0 ms
//! timeout): 98% of an idle relay's CPU, ~9 ms a second. Polling in one-second slices
//! leaves a tenth of that (docs/performance.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};

use crate::outbox::OutboxEvent;
use crate::sink::kafka::client_log::LogContext;

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

/// Where librdkafka put a record (partition, offset), or why it did not, with the record.
pub type Delivered = Result<(i32, i64), (KafkaError, OwnedMessage)>;

/// Resolves when the broker acknowledged the record or it failed for good; an error
/// (the sender dropped) means the producer went away with the record.
pub type Delivery = tokio::sync::oneshot::Receiver<Delivered>;

impl ProducerContext for LogContext {
    type DeliveryOpaque = Box<tokio::sync::oneshot::Sender<Delivered>>;

    fn delivery(&self, result: &DeliveryResult<'_>, reply: Self::DeliveryOpaque) {
        let delivered = match result {
            Ok(message) => Ok((message.partition(), message.offset())),
            Err((error, message)) => Err((error.clone(), message.detach())),
        };
        // Nobody waits any more when the relay has given up on the record (shutdown).
        let _ = reply.send(delivered);
    }
}

#[derive(Clone)]
pub struct Producer {
    inner: Arc<BaseProducer<LogContext>>,
    _poller: Arc<PollThread>,
}

/// Serves librdkafka's delivery reports and errors until the last [`Producer`] clone is
/// dropped; it then ends within a poll slice, dropping librdkafka's handle last.
struct PollThread {
    stop: Arc<AtomicBool>,
}

/// One poll slice: how late the thread notices it should stop, and how often it spins
/// through a millisecond (see the module doc).
const POLL_SLICE: Duration = Duration::from_secs(1);

impl PollThread {
    fn start(producer: Arc<BaseProducer<LogContext>>) -> Result<Self, ProducerConfigError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("kafka-delivery".into())
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) {
                    producer.poll(POLL_SLICE);
                }
            })
            .map_err(|e| ProducerConfigError::Client(format!("cannot start the delivery thread: {e}")))?;
        Ok(PollThread { stop })
    }
}

impl Drop for PollThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
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
        let inner: BaseProducer<LogContext> = config
            .create_with_context(LogContext::default())
            .map_err(|e: KafkaError| ProducerConfigError::Client(e.to_string()))?;
        let inner = Arc::new(inner);
        let poller = Arc::new(PollThread::start(Arc::clone(&inner))?);
        Ok(Producer { inner, _poller: poller })
    }

    /// The librdkafka client, for metadata.
    pub fn inner(&self) -> &BaseProducer<LogContext> {
        &self.inner
    }

    /// Hands one record for `partition` to librdkafka. Returns at once; the future
    /// resolves when the broker acknowledged the record or it failed for good.
    pub fn send(&self, event: &OutboxEvent, partition: i32) -> Result<Delivery, KafkaError> {
        self.send_parts(
            &event.topic,
            partition,
            event.key.as_deref(),
            event.payload.as_deref(),
            &event.headers,
        )
    }

    pub fn send_parts(
        &self,
        topic: &str,
        partition: i32,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(crate::outbox::HeaderName, Option<Bytes>)],
    ) -> Result<Delivery, KafkaError> {
        let mut kafka_headers = OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in headers {
            kafka_headers = kafka_headers.insert(Header {
                key: name.as_ref(),
                value: value.as_deref(),
            });
        }
        let (reply, delivery) = tokio::sync::oneshot::channel();
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(reply))
            .partition(partition)
            .headers(kafka_headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        self.inner.send(record).map_err(|(error, _record)| error)?;
        Ok(delivery)
    }

    /// Waits (bounded) for librdkafka to deliver what it holds.
    pub fn flush(&self, timeout: std::time::Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout)
    }
}
