//! Everything that talks to Kafka: the producer, its error classes, and the pipeline of
//! deliveries in flight.

pub mod client_log;
pub mod errors;
pub mod fence;
pub mod partitioner;
pub mod pipeline;
pub mod producer;

pub use errors::{classify, is_too_large};
pub use fence::{Fence, FenceError, Route, TopicId};
pub use pipeline::{Acked, Failure, Pipeline, SubmitError};
pub use producer::{Producer, ProducerSettings};
