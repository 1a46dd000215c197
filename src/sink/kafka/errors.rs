//! The one place that decides what a librdkafka error means for the relay.
//!
//! - *Transient*: the broker or network will recover (broker down, leader moving,
//!   throttling, timeouts). Retried, never dead-lettered, never a reason to confirm.
//! - *Poison*: this one record can never be written (too large, illegal or unknown
//!   topic, not authorised for the topic). Retrying cannot help.
//! - *Fatal*: the producer itself is unusable (idempotence state broken, cluster
//!   authorisation). The relay stops and a restart resumes from the confirmed LSN.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::error::ErrorClass;

/// Classifies an error returned by a produce call or a delivery report.
pub fn classify(error: &KafkaError) -> ErrorClass {
    match error.rdkafka_error_code() {
        Some(code) => classify_code(code),
        // Client-side problems without a code: a cancelled delivery (producer dropped)
        // or a closed channel. The record may not be written; try again.
        None => ErrorClass::Transient,
    }
}

impl crate::error::Classify for KafkaError {
    fn class(&self) -> ErrorClass {
        classify(self)
    }
}

/// The record alone is larger than the broker or the producer accepts: dead-lettered
/// without its payload.
pub fn is_too_large(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        error.rdkafka_error_code(),
        Some(C::MessageSizeTooLarge | C::MessageBatchTooLarge | C::InvalidMessageSize)
    )
}

fn classify_code(code: RDKafkaErrorCode) -> ErrorClass {
    use RDKafkaErrorCode as C;
    match code {
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::MessageBatchTooLarge
        | C::InvalidMessage
        | C::InvalidRecord
        | C::InvalidTopic
        | C::UnknownTopic
        | C::UnknownTopicOrPartition
        | C::UnknownPartition
        | C::TopicAuthorizationFailed
        | C::PolicyViolation
        | C::InvalidRequiredAcks
        | C::BadMessage => ErrorClass::Poison,
        C::Fatal
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::InvalidProducerEpoch
        | C::ProducerFenced
        | C::OutOfOrderSequenceNumber
        | C::UnsupportedForMessageFormat
        | C::UnsupportedVersion
        | C::SaslAuthenticationFailed
        | C::Authentication
        | C::InvalidArgument
        | C::InvalidConfig => ErrorClass::Fatal,
        _ => ErrorClass::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_transient() {
        for code in [
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::LeaderNotAvailable,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::BrokerTransportFailure,
        ] {
            assert_eq!(
                classify(&KafkaError::MessageProduction(code)),
                ErrorClass::Transient,
                "{code:?}"
            );
        }
    }

    #[test]
    fn record_specific_failures_are_poison() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::InvalidTopic,
        ] {
            assert_eq!(
                classify(&KafkaError::MessageProduction(code)),
                ErrorClass::Poison,
                "{code:?}"
            );
        }
    }

    #[test]
    fn broken_producer_state_is_fatal() {
        for code in [RDKafkaErrorCode::Fatal, RDKafkaErrorCode::OutOfOrderSequenceNumber] {
            assert_eq!(
                classify(&KafkaError::MessageProduction(code)),
                ErrorClass::Fatal,
                "{code:?}"
            );
        }
    }
}
