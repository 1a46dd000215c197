//! Records in flight: handed to librdkafka, not yet acknowledged.
//!
//! Many records are in flight at once (a pipeline, not one at a time); acknowledgements
//! come back in any order across partitions, each carrying the caller's tag so that
//! `progress` can match it to its transaction. The caller bounds the window with
//! [`Pipeline::len`]; librdkafka's own queue is bounded in bytes by the producer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;

use super::errors::classify;
use super::producer::{Delivery, Producer};
use crate::error::ErrorClass;
use crate::outbox::OutboxEvent;

/// A record could not even be handed to librdkafka.
#[derive(Debug)]
pub enum SubmitError {
    /// librdkafka's queue is full: wait for an acknowledgement, then submit again.
    QueueFull,
    /// Any other refusal, with its class.
    Refused { class: ErrorClass, error: KafkaError },
}

/// The outcome of one record.
#[derive(Debug)]
pub struct Acked<T> {
    pub tag: T,
    /// Partition and offset, or why the record was not written.
    pub result: Result<(i32, i64), Failure>,
}

/// A record that was not written, with the record itself when librdkafka returned it
/// (so that it can be dead-lettered with its original bytes).
#[derive(Debug)]
pub struct Failure {
    pub class: ErrorClass,
    pub error: KafkaError,
    pub record: Option<OwnedMessage>,
}

pub struct Pipeline<T> {
    producer: Producer,
    in_flight: FuturesUnordered<Tagged<T>>,
}

impl<T: Unpin> Pipeline<T> {
    pub fn new(producer: Producer) -> Self {
        Pipeline {
            producer,
            in_flight: FuturesUnordered::new(),
        }
    }

    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    /// Records handed to librdkafka and not yet reported back.
    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Hands `event` to librdkafka; on refusal the tag comes back with the reason, so that
    /// the caller can try again without rebuilding it.
    pub fn submit(&mut self, event: &OutboxEvent, partition: i32, tag: T) -> Result<(), (SubmitError, T)> {
        match self.producer.send(event, partition) {
            Ok(delivery) => {
                self.in_flight.push(Tagged {
                    tag: Some(tag),
                    delivery,
                });
                Ok(())
            }
            Err(KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull)) => {
                Err((SubmitError::QueueFull, tag))
            }
            Err(error) => Err((
                SubmitError::Refused {
                    class: classify(&error),
                    error,
                },
                tag,
            )),
        }
    }

    /// The next acknowledgement, in completion order; `None` when nothing is in flight.
    /// Cancel-safe: a dropped call loses no acknowledgement.
    pub async fn next_ack(&mut self) -> Option<Acked<T>> {
        self.in_flight.next().await
    }
}

/// A delivery future that remembers whose record it is.
struct Tagged<T> {
    tag: Option<T>,
    delivery: Delivery,
}

impl<T: Unpin> Future for Tagged<T> {
    type Output = Acked<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let outcome = match Pin::new(&mut this.delivery).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(outcome) => outcome,
        };
        let result = match outcome {
            Ok(Ok(written)) => Ok(written),
            Ok(Err((error, record))) => Err(Failure {
                class: classify(&error),
                error,
                record: Some(record),
            }),
            // The producer went away with the record: it may not be written.
            Err(_canceled) => Err(Failure {
                class: ErrorClass::Transient,
                error: KafkaError::Canceled,
                record: None,
            }),
        };
        match this.tag.take() {
            Some(tag) => Poll::Ready(Acked { tag, result }),
            // Polled again after completion: FuturesUnordered never does this.
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::outbox::{OutboxEvent, SourcePosition};
    use crate::sink::kafka::producer::ProducerSettings;

    fn event(id: &str) -> OutboxEvent {
        OutboxEvent {
            id: id.into(),
            topic: "orders".into(),
            key: Some(bytes::Bytes::from_static(b"k")),
            payload: Some(bytes::Bytes::from_static(b"{}")),
            headers: Vec::new(),
            position: SourcePosition {
                commit_lsn: Lsn(1),
                index: 0,
            },
            content_type: None,
        }
    }

    /// A producer with no broker to reach (nothing listens on port 9).
    fn producer(properties: &[(&str, &str)]) -> Producer {
        Producer::new(&ProducerSettings {
            bootstrap_servers: "127.0.0.1:9".into(),
            properties: properties
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn an_undelivered_record_comes_back_with_its_tag_as_a_transient_failure() {
        let mut pipeline = Pipeline::new(producer(&[("message.timeout.ms", "200")]));
        for n in 0..3 {
            pipeline
                .submit(&event(&format!("e{n}")), 0, n)
                .unwrap_or_else(|e| panic!("{e:?}"));
        }
        assert_eq!(pipeline.len(), 3);
        let mut tags = Vec::new();
        while let Some(ack) = pipeline.next_ack().await {
            let failure = ack.result.err().unwrap_or_else(|| panic!("no broker, no delivery"));
            assert_eq!(failure.class, ErrorClass::Transient, "{}", failure.error);
            // The record itself comes back, to be dead-lettered with its bytes if need be.
            assert!(failure.record.is_some());
            tags.push(ack.tag);
        }
        tags.sort_unstable();
        assert_eq!(tags, vec![0, 1, 2]);
        assert!(pipeline.is_empty());
    }

    #[tokio::test]
    async fn a_full_producer_queue_asks_the_caller_to_wait() {
        let mut pipeline = Pipeline::new(producer(&[("queue.buffering.max.messages", "1")]));
        pipeline
            .submit(&event("first"), 0, ())
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(matches!(
            pipeline.submit(&event("second"), 0, ()),
            Err((SubmitError::QueueFull, ()))
        ));
        assert_eq!(pipeline.len(), 1);
    }
}
