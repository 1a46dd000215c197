//! Kafka behind the sink boundary: the fence picks each record's partition and skips what
//! an earlier run wrote; the pipeline carries records to librdkafka and their delivery
//! reports back.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Headers as _, Message as _, OwnedMessage};
use rdkafka::producer::Producer as _;

use super::errors::is_too_large;
use super::fence::{Fence, FenceError, Route, TopicId};
use super::pipeline::{self, Pipeline, SubmitError};
use super::producer::{Producer, ProducerSettings};
use crate::error::{ErrorClass, RelayError};
use crate::metrics::Metrics;
use crate::outbox::OutboxEvent;
use crate::sink::{Acked, Failure, Refusal, Returned, Sink, SinkError, Submitted, Tag};

/// How often a wait for the broker to describe a new topic is logged.
const TOPIC_READ_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// What a record in librdkafka's hands carries: the publisher's tag and the route the
/// fence must learn of once the record is written.
type KafkaTag = (Tag, TopicId, i32);

pub struct KafkaSink {
    pipeline: Pipeline<KafkaTag>,
    fence: Fence,
    /// Outcomes that arrived while `submit` waited, oldest first.
    early: VecDeque<Acked>,
    metrics: Arc<Metrics>,
}

impl KafkaSink {
    /// `exactly_once = false`: the fence only picks partitions.
    pub fn new(
        settings: &ProducerSettings,
        source: &str,
        exactly_once: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RelayError> {
        let producer = Producer::new(settings).map_err(|e| RelayError::Config(e.to_string()))?;
        let fence = Fence::new(producer.clone(), settings, source.to_owned(), exactly_once);
        Ok(KafkaSink {
            pipeline: Pipeline::new(producer),
            fence,
            early: VecDeque::new(),
            metrics,
        })
    }

    pub fn producer(&self) -> &Producer {
        self.pipeline.producer()
    }

    /// Turns a delivery report into an outcome; a written record moves the fence.
    fn outcome(&mut self, ack: pipeline::Acked<KafkaTag>) -> Acked {
        let (tag, topic, partition) = ack.tag;
        let result = match ack.result {
            Ok(_) => {
                self.fence.written(topic, partition, tag.position);
                Ok(())
            }
            Err(failure) => Err(Failure {
                refusal: Refusal {
                    class: failure.class,
                    reason: failure.error.to_string(),
                    too_large: is_too_large(&failure.error),
                },
                returned: failure.record.as_ref().map(|record| Box::new(returned(record))),
            }),
        };
        Acked { tag, result }
    }

    /// Routes `event`: reads its topic from the broker the first time. The inner error is
    /// the broker's refusal of the topic for good.
    async fn route(&mut self, event: &OutboxEvent) -> Result<Result<Route, FenceError>, SinkError> {
        if let Some(route) = self.fence.route(&event.topic, event.routing_key(), event.position) {
            return Ok(Ok(route));
        }
        if let Err(error) = self.read_topic(&event.topic).await? {
            return Ok(Err(error));
        }
        self.fence
            .route(&event.topic, event.routing_key(), event.position)
            .map(Ok)
            .ok_or_else(|| {
                SinkError::transient(
                    "exactly-once fence",
                    format!("topic {} was read but is not known", event.topic),
                )
            })
    }

    /// Reads a topic the relay has not written to yet (its partitions and, for
    /// exactly-once, this source's last records there) while delivery reports go on being
    /// collected; the wait is logged and counted in `topics_being_read`.
    async fn read_topic(&mut self, topic: &str) -> Result<Result<(), FenceError>, SinkError> {
        let mut reading = self.fence.read_topic(topic);
        let started = std::time::Instant::now();
        let mut report = tokio::time::interval_at(
            tokio::time::Instant::now() + TOPIC_READ_LOG_INTERVAL,
            TOPIC_READ_LOG_INTERVAL,
        );
        let _gauge = GaugeGuard::raise(&self.metrics);
        let tail = loop {
            tokio::select! {
                biased;
                read = &mut reading => break read.unwrap_or_else(|_| Err(FenceError {
                    topic: topic.to_owned(),
                    class: ErrorClass::Transient,
                    reason: "the thread reading the topic ended without an answer".into(),
                })),
                Some(ack) = self.pipeline.next_ack(), if !self.pipeline.is_empty() => {
                    let outcome = self.outcome(ack);
                    self.early.push_back(outcome);
                }
                _ = report.tick() => tracing::warn!(topic, waited_ms = started.elapsed().as_millis() as u64, "waiting for the broker to describe a new topic before its first event; reading is paused"),
            }
        };
        let tail = match tail {
            Ok(tail) => tail,
            Err(error) if error.class == ErrorClass::Transient => {
                return Err(SinkError::new("exactly-once fence", error));
            }
            Err(error) => return Ok(Err(error)),
        };
        self.fence.learned(topic, tail);
        tracing::debug!(topic, took_ms = started.elapsed().as_millis() as u64, "topic read");
        Ok(Ok(()))
    }
}

impl Sink for KafkaSink {
    async fn submit(&mut self, event: &OutboxEvent, tag: Tag) -> Result<Submitted, SinkError> {
        let route = match self.route(event).await? {
            Ok(route) => route,
            Err(error) => {
                return Ok(Submitted::Refused(Refusal {
                    class: error.class,
                    reason: error.to_string(),
                    too_large: false,
                }))
            }
        };
        if route.already_written {
            return Ok(Submitted::AlreadyWritten);
        }
        let mut tagged = (tag, route.topic, route.partition);
        loop {
            tagged = match self.pipeline.submit(event, route.partition, tagged) {
                Ok(()) => return Ok(Submitted::Queued),
                Err((SubmitError::QueueFull, tagged)) => match self.pipeline.next_ack().await {
                    Some(ack) => {
                        let outcome = self.outcome(ack);
                        self.early.push_back(outcome);
                        tagged
                    }
                    None => {
                        return Ok(Submitted::Refused(Refusal {
                            class: ErrorClass::Poison,
                            reason: "the record alone exceeds the producer's queue (queue.buffering.max.kbytes)".into(),
                            too_large: true,
                        }))
                    }
                },
                Err((
                    SubmitError::Refused {
                        class: ErrorClass::Transient,
                        error,
                    },
                    _,
                )) => return Err(SinkError::new(format!("Kafka refused event id={}", event.id), error)),
                Err((SubmitError::Refused { class, error }, _)) => {
                    return Ok(Submitted::Refused(Refusal {
                        class,
                        too_large: is_too_large(&error),
                        reason: error.to_string(),
                    }))
                }
            };
        }
    }

    async fn next_ack(&mut self) -> Option<Acked> {
        if let Some(early) = self.early.pop_front() {
            return Some(early);
        }
        let ack = self.pipeline.next_ack().await?;
        Some(self.outcome(ack))
    }

    fn in_flight(&self) -> usize {
        self.pipeline.len() + self.early.len()
    }
}

/// Counts a topic being read for as long as it lives.
struct GaugeGuard(Arc<Metrics>);

impl GaugeGuard {
    fn raise(metrics: &Arc<Metrics>) -> Self {
        metrics.topics_being_read.inc();
        GaugeGuard(Arc::clone(metrics))
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.topics_being_read.dec();
    }
}

/// A record as librdkafka handed it back.
fn returned(record: &OwnedMessage) -> Returned {
    let bytes = |b: Option<&[u8]>| b.map(bytes::Bytes::copy_from_slice);
    Returned {
        destination: Some(record.topic().to_owned()),
        key: bytes(record.key()),
        payload: bytes(record.payload()),
        headers: record
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_owned().into(), h.value.map(bytes::Bytes::copy_from_slice)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Whether Kafka answers a metadata request (bounded, off the async threads).
pub async fn answers(producer: &Producer) -> bool {
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || {
        producer
            .inner()
            .client()
            .fetch_metadata(None, Duration::from_secs(2))
            .is_ok()
    })
    .await
    .unwrap_or(false)
}
