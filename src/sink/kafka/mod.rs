//! Kafka: the producer, its error classes, the partition fence that makes publishing
//! exactly-once across restarts, and the pipeline of deliveries in flight, behind the
//! [`Sink`](crate::sink::Sink) boundary ([`KafkaSink`]).

pub mod check;
pub mod client_log;
pub mod errors;
pub mod fence;
pub mod partitioner;
pub mod pipeline;
pub mod producer;
mod sink;

pub use errors::classify;
pub use producer::{Producer, ProducerSettings};
pub use sink::{answers, KafkaSink};
