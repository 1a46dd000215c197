//! Everything that talks to Kafka: the producer, its error classes, and the pipeline of
//! deliveries in flight.

pub mod errors;
pub mod partitioner;
pub mod pipeline;
pub mod producer;

pub use errors::{classify, ErrorClass};
pub use pipeline::{Acked, Pipeline, SubmitError};
pub use producer::{Producer, ProducerSettings};
