//! Where events go: one boundary for every broker.
//!
//! A [`Sink`] takes mapped events in commit order, tells of each one's outcome when the
//! broker has answered, and classifies every failure as transient (the session ends and
//! resumes from the confirmed position), poison (this record can never be written: it is
//! dead-lettered or halts the relay) or fatal (the relay stops). What a sink does not do:
//! decide what is confirmed. The [`publisher`](crate::publisher) turns outcomes into
//! progress notes, and only the session loop talks to `progress` and the stream, so the
//! progress rule is the same for every broker.
//!
//! Each sink keeps its own machinery behind the boundary: Kafka its partition fence
//! (exactly-once across restarts) and librdkafka's pipeline; RabbitMQ its channel in
//! confirm mode.

pub mod kafka;
pub mod rabbitmq;

use std::future::Future;

use bytes::Bytes;

use crate::error::{Classify, ErrorClass, RelayError};
use crate::metrics::Metrics;
use crate::outbox::{Headers, OutboxEvent, SourcePosition};
use crate::progress::TxnId;

/// Which broker the relay publishes to (`--sink`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkKind {
    Kafka,
    Rabbitmq,
}

impl SinkKind {
    /// The name used in metrics labels and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Kafka => "kafka",
            SinkKind::Rabbitmq => "rabbitmq",
        }
    }
}

/// The broker settings of the chosen sink, validated.
#[derive(Debug, Clone)]
pub enum SinkSettings {
    Kafka(kafka::ProducerSettings),
    Rabbitmq(rabbitmq::AmqpSettings),
}

impl SinkSettings {
    pub fn kind(&self) -> SinkKind {
        match self {
            SinkSettings::Kafka(_) => SinkKind::Kafka,
            SinkSettings::Rabbitmq(_) => SinkKind::Rabbitmq,
        }
    }
}

/// A transaction as the events in flight know it.
#[derive(Debug, Clone, Copy)]
pub struct TxnRef {
    pub id: TxnId,
    /// Unix microseconds.
    pub commit_time: i64,
}

/// Whose record an outcome is for: what the publisher needs back, whatever the broker.
#[derive(Debug)]
pub struct Tag {
    pub txn: TxnRef,
    pub id: String,
    pub position: SourcePosition,
    /// The record is an event's dead letter, not the event.
    pub dead_letter: bool,
    pub payload_bytes: u64,
}

/// What became of a submitted event.
#[derive(Debug)]
pub enum Submitted {
    /// Handed to the broker; its outcome comes from [`Sink::next_ack`].
    Queued,
    /// An earlier run already wrote it (exactly-once); nothing was sent.
    AlreadyWritten,
    /// The broker (or the sink) refused it for good before it was sent.
    Refused(Refusal),
}

/// Why a record cannot be written; its class is poison or fatal.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub class: ErrorClass,
    pub reason: String,
    /// The record alone is larger than the broker accepts: dead-lettered without payload.
    pub too_large: bool,
}

/// The outcome of one record.
#[derive(Debug)]
pub struct Acked {
    pub tag: Tag,
    pub result: Result<(), Failure>,
}

/// A record that was not written.
#[derive(Debug)]
pub struct Failure {
    pub refusal: Refusal,
    /// The record as the broker handed it back, when it did (for its dead letter).
    pub returned: Option<Box<Returned>>,
}

/// A record the broker handed back, in the relay's own terms.
#[derive(Debug, Clone, Default)]
pub struct Returned {
    pub destination: Option<String>,
    pub key: Option<Bytes>,
    pub payload: Option<Bytes>,
    pub headers: Headers,
}

/// The sink as a whole could not go on (broker unreachable, connection lost, a
/// destination that could not be looked up for a while, ...).
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct SinkError {
    pub context: String,
    pub class: ErrorClass,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl SinkError {
    pub fn new<E>(context: impl Into<String>, error: E) -> Self
    where
        E: std::error::Error + Classify + Send + Sync + 'static,
    {
        SinkError {
            context: context.into(),
            class: error.class(),
            source: Box::new(error),
        }
    }

    pub fn transient(context: impl Into<String>, reason: impl Into<String>) -> Self {
        SinkError {
            context: context.into(),
            class: ErrorClass::Transient,
            source: reason.into().into(),
        }
    }
}

impl Classify for SinkError {
    fn class(&self) -> ErrorClass {
        self.class
    }
}

impl From<SinkError> for RelayError {
    fn from(error: SinkError) -> Self {
        RelayError::Broker {
            context: error.context,
            class: error.class,
            source: error.source,
        }
    }
}

/// What every broker needs: events in commit order in, outcomes out.
pub trait Sink: Send {
    /// Hands `event` to the broker, after every event submitted before it. Waits as long
    /// as the broker needs (room in its queue, a destination being looked up); outcomes
    /// that arrive meanwhile are kept for [`next_ack`](Self::next_ack). Dropping the
    /// future leaves `event` unsent and loses no outcome.
    fn submit(&mut self, event: &OutboxEvent, tag: Tag) -> impl Future<Output = Result<Submitted, SinkError>> + Send;

    /// The next outcome, in completion order; `None` when nothing is in flight.
    /// Cancel-safe.
    fn next_ack(&mut self) -> impl Future<Output = Option<Acked>> + Send;

    /// Records submitted and not yet reported back.
    fn in_flight(&self) -> usize;
}

/// The sink chosen at start (one per process; an enum keeps the loop free of generics).
#[allow(clippy::large_enum_variant)] // one value per process, never moved in a hot path
pub enum AnySink {
    Kafka(kafka::KafkaSink),
    Rabbitmq(rabbitmq::RabbitSink),
}

impl AnySink {
    /// Creates the sink for `settings`. Connecting happens on first use, so that a broker
    /// outage at start is ridden out like one later.
    pub fn new(
        settings: &SinkSettings,
        source: &str,
        exactly_once: bool,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<Self, RelayError> {
        Ok(match settings {
            SinkSettings::Kafka(producer) => {
                AnySink::Kafka(kafka::KafkaSink::new(producer, source, exactly_once, metrics)?)
            }
            SinkSettings::Rabbitmq(amqp) => AnySink::Rabbitmq(rabbitmq::RabbitSink::new(amqp.clone())),
        })
    }

    /// Meets the broker before the first event, so that what retrying cannot mend (a
    /// missing exchange, refused credentials) ends the run at start. `Ok` when the broker
    /// is merely unreachable: that is an outage, ridden out once events come.
    pub async fn prepare(&mut self) -> Result<(), SinkError> {
        match self {
            AnySink::Kafka(_) => Ok(()),
            AnySink::Rabbitmq(sink) => match sink.connect_now().await {
                Err(error) if error.class == ErrorClass::Fatal => Err(error),
                Err(error) => {
                    tracing::warn!(error = %crate::error::chain(&error), "RabbitMQ not reachable yet; events wait for it");
                    Ok(())
                }
                Ok(()) => Ok(()),
            },
        }
    }

    /// A handle the monitor asks whether the broker answers.
    pub fn probe(&self) -> Probe {
        match self {
            AnySink::Kafka(sink) => Probe::Kafka(sink.producer().clone()),
            AnySink::Rabbitmq(sink) => Probe::Rabbitmq(sink.probe()),
        }
    }
}

impl Sink for AnySink {
    async fn submit(&mut self, event: &OutboxEvent, tag: Tag) -> Result<Submitted, SinkError> {
        match self {
            AnySink::Kafka(sink) => sink.submit(event, tag).await,
            // Boxed: lapin's futures are large, and the Kafka path, which moves millions of
            // events a minute, should not carry their size in every call's state.
            AnySink::Rabbitmq(sink) => Box::pin(sink.submit(event, tag)).await,
        }
    }

    async fn next_ack(&mut self) -> Option<Acked> {
        match self {
            AnySink::Kafka(sink) => sink.next_ack().await,
            AnySink::Rabbitmq(sink) => Box::pin(sink.next_ack()).await,
        }
    }

    fn in_flight(&self) -> usize {
        match self {
            AnySink::Kafka(sink) => sink.in_flight(),
            AnySink::Rabbitmq(sink) => sink.in_flight(),
        }
    }
}

/// `check`'s questions to the broker: reachable, destinations exist, rights.
pub async fn check(settings: &SinkSettings, dead_letter_topic: &str) -> Vec<crate::check::Item> {
    match settings {
        SinkSettings::Kafka(producer) => kafka::check::check(producer, dead_letter_topic).await,
        SinkSettings::Rabbitmq(amqp) => rabbitmq::check(amqp, dead_letter_topic).await,
    }
}

/// Asks a broker whether it answers, for `/readyz` and the `broker_reachable` metric.
#[derive(Clone)]
pub enum Probe {
    Kafka(kafka::Producer),
    Rabbitmq(rabbitmq::Probe),
}

impl Probe {
    /// Bounded (a few seconds); never blocks the async threads.
    pub async fn answers(&self) -> bool {
        match self {
            Probe::Kafka(producer) => kafka::answers(producer).await,
            Probe::Rabbitmq(probe) => probe.answers().await,
        }
    }
}
