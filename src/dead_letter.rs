//! Builds the dead-letter record for an event that can never be published.
//!
//! The record keeps the original bytes (key, value, headers, as far as they could be
//! formed) and adds headers that say what went wrong and where the event came from:
//! `outbox.error`, `outbox.error_class`, `outbox.original_topic`, `id`,
//! `outbox.commit_lsn`, `outbox.tx_index` and `outbox.source`.

use bytes::Bytes;

use crate::error::ErrorClass;
use crate::error::RelayError;
use crate::outbox::{
    MappingError, OutboxEvent, SourcePosition, HEADER_COMMIT_LSN, HEADER_ID, HEADER_SOURCE, HEADER_TX_INDEX,
};
use crate::sink::Returned;

/// Header with the reason the event could not be published.
pub const HEADER_ERROR: &str = "outbox.error";
/// Header with the class of that reason (`poison`).
pub const HEADER_ERROR_CLASS: &str = "outbox.error_class";
/// Header with the topic the event was meant for, when it could be formed.
pub const HEADER_ORIGINAL_TOPIC: &str = "outbox.original_topic";
/// Header with the size of a payload left out because the record was too large for
/// the broker; the row itself stays in the outbox table under its id.
pub const HEADER_PAYLOAD_OMITTED: &str = "outbox.payload_omitted_bytes";

/// An event on its way to the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: Option<String>,
    pub position: SourcePosition,
    pub original_topic: Option<String>,
    pub key: Option<Bytes>,
    pub payload: Option<Bytes>,
    pub headers: crate::outbox::Headers,
    pub class: ErrorClass,
    pub reason: String,
}

impl DeadLetter {
    /// A row that could not be turned into a record at all.
    pub fn from_mapping(error: &MappingError, key: Option<Bytes>, payload: Option<Bytes>) -> Self {
        DeadLetter {
            id: error.id.clone(),
            position: error.position,
            original_topic: None,
            key,
            payload,
            headers: Vec::new(),
            class: ErrorClass::Poison,
            reason: error.reason.clone(),
        }
    }

    /// A record the broker refused for good before it was sent (or its route failed).
    pub fn from_event(event: &OutboxEvent, class: ErrorClass, reason: String) -> Self {
        DeadLetter {
            id: Some(event.id.clone()),
            position: event.position,
            original_topic: Some(event.topic.clone()),
            key: event.key.clone(),
            payload: event.payload.clone(),
            headers: event.headers.clone(),
            class,
            reason,
        }
    }

    /// A record the broker refused for good after it was sent, as the broker handed it
    /// back (when it did).
    pub fn from_returned(
        returned: Option<Box<Returned>>,
        id: &str,
        position: SourcePosition,
        class: ErrorClass,
        reason: String,
    ) -> Self {
        let returned = returned.map(|r| *r).unwrap_or_default();
        DeadLetter {
            id: Some(id.to_owned()),
            position,
            original_topic: returned.destination,
            key: returned.key,
            payload: returned.payload,
            headers: returned.headers,
            class,
            reason,
        }
    }

    /// Leaves the payload out (a record too large for the broker stays too large in the
    /// dead-letter topic), saying how large it was.
    pub fn without_payload(mut self) -> Self {
        let size = self.payload.take().map_or(0, |p| p.len());
        self.headers
            .push((HEADER_PAYLOAD_OMITTED.into(), Some(Bytes::from(size.to_string()))));
        self
    }

    /// The record for the dead-letter `topic`.
    pub fn into_event(self, topic: &str, source: &str) -> OutboxEvent {
        let id = self.id.clone().unwrap_or_default();
        let replaced = [HEADER_ID, HEADER_COMMIT_LSN, HEADER_TX_INDEX, HEADER_SOURCE];
        let mut headers: crate::outbox::Headers = self
            .headers
            .into_iter()
            .filter(|(name, _)| !replaced.contains(&name.as_ref()))
            .collect();
        headers.push((HEADER_ERROR.into(), Some(Bytes::from(self.reason))));
        headers.push((
            HEADER_ERROR_CLASS.into(),
            Some(Bytes::from_static(self.class.as_str().as_bytes())),
        ));
        if let Some(original) = self.original_topic {
            headers.push((HEADER_ORIGINAL_TOPIC.into(), Some(Bytes::from(original))));
        }
        headers.push((HEADER_ID.into(), Some(Bytes::from(id.clone()))));
        headers.push((
            HEADER_COMMIT_LSN.into(),
            Some(Bytes::from(self.position.commit_lsn.to_string())),
        ));
        headers.push((
            HEADER_TX_INDEX.into(),
            Some(Bytes::from(self.position.index.to_string())),
        ));
        headers.push((HEADER_SOURCE.into(), Some(Bytes::copy_from_slice(source.as_bytes()))));
        OutboxEvent {
            key: Some(self.key.unwrap_or_else(|| Bytes::from(id.clone()))),
            payload: self.payload,
            topic: topic.to_owned(),
            id,
            headers,
            position: self.position,
            content_type: None,
        }
    }

    /// The error that stops the relay when dead-lettering is off (or impossible).
    pub fn into_halt_error(self) -> RelayError {
        RelayError::Delivery {
            id: self.id.unwrap_or_else(|| "<unknown>".into()),
            commit_lsn: self.position.commit_lsn,
            index: self.position.index,
            class: self.class,
            reason: self.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    #[test]
    fn the_dead_letter_record_names_the_error_and_the_source_position() {
        let error = MappingError {
            id: Some("id-1".into()),
            position: SourcePosition {
                commit_lsn: Lsn(0x20),
                index: 2,
            },
            reason: "column aggregate_id is NULL".into(),
        };
        let event =
            DeadLetter::from_mapping(&error, None, Some(Bytes::from_static(b"{}"))).into_event("dlq", "db/slot");
        let header = |name: &str| event.header(name).flatten().cloned();
        assert_eq!(event.topic, "dlq");
        assert_eq!(event.payload, Some(Bytes::from_static(b"{}")));
        assert_eq!(event.key, Some(Bytes::from_static(b"id-1")));
        assert_eq!(header("id"), Some(Bytes::from_static(b"id-1")));
        assert_eq!(header("outbox.commit_lsn"), Some(Bytes::from_static(b"0/20")));
        assert_eq!(header("outbox.tx_index"), Some(Bytes::from_static(b"2")));
        assert_eq!(header("outbox.error_class"), Some(Bytes::from_static(b"poison")));
        assert_eq!(header("outbox.source"), Some(Bytes::from_static(b"db/slot")));
        assert!(header("outbox.error").is_some_and(|e| e.starts_with(b"column")));
    }
}
