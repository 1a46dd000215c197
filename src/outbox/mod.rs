//! Turns one outbox row into one record: topic (the destination's name for every sink),
//! key, value and headers.
//!
//! Columns are found by name in the table's Relation message, never by position, so
//! `ALTER TABLE outbox ADD COLUMN ...` or a reordered table keeps working. A row that
//! cannot become a record (a required value is NULL, the topic name is illegal) is a
//! [`MappingError`] naming the row's id and source position; it is never skipped here.

use std::collections::HashMap;

use bytes::Bytes;

use crate::debezium_values::Rendering;

use crate::lsn::Lsn;
use crate::postgres::pgoutput::{Insert, Relation, Value};

/// Header carrying the outbox row's `id`.
pub const HEADER_ID: &str = "id";
/// Header carrying the outbox row's `event_type`.
pub const HEADER_EVENT_TYPE: &str = "event_type";
/// Header carrying the outbox row's `aggregate_type`.
pub const HEADER_AGGREGATE_TYPE: &str = "aggregate_type";
/// Header carrying the commit LSN of the row's transaction, as `16/B374D848`.
pub const HEADER_COMMIT_LSN: &str = "outbox.commit_lsn";
/// Header carrying the row's index (from 0) among the events of its transaction.
pub const HEADER_TX_INDEX: &str = "outbox.tx_index";
/// Header marking a record as a replay (`outbox-relay replay`), with the run's name.
pub const HEADER_REPLAY: &str = "outbox.replay";
/// Header naming where the event came from (`<database>/<slot>`), so that exactly-once
/// publishing only compares positions from the same source.
pub const HEADER_SOURCE: &str = "outbox.source";

/// Where an event sits in the source: its transaction's commit LSN and its index there.
/// Unique per event and ordered like the commit order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourcePosition {
    pub commit_lsn: Lsn,
    pub index: u32,
}

/// A header name: the relay's own names are static, so naming them allocates nothing.
pub type HeaderName = std::borrow::Cow<'static, str>;

/// A record's headers, in order; a `None` value is a header without a value.
pub type Headers = Vec<(HeaderName, Option<Bytes>)>;

/// A record ready for the broker. Key and value share the replication buffer (no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    pub id: String,
    pub topic: String,
    /// `None` for a table without a key column (`--column aggregate_id=`).
    pub key: Option<Bytes>,
    /// `None` is a tombstone (a NULL payload under `--preset debezium`).
    pub payload: Option<Bytes>,
    pub headers: Headers,
    pub position: SourcePosition,
    /// The payload's media type when its column says it (`application/json` for json and
    /// jsonb), for brokers that carry one (RabbitMQ's `content_type`).
    pub content_type: Option<&'static str>,
}

/// The media type of JSON payloads.
pub const JSON: &str = "application/json";
/// The media type of text payloads.
pub const TEXT: &str = "text/plain; charset=utf-8";

impl OutboxEvent {
    /// What picks the record's partition: its key, or for a keyless event its id, so that
    /// the same event always lands in the same partition (the exactly-once fence compares
    /// positions per partition).
    pub fn routing_key(&self) -> &[u8] {
        self.key.as_deref().unwrap_or(self.id.as_bytes())
    }

    /// The value of the first header called `name`: `None` if there is none,
    /// `Some(None)` for a header without a value.
    pub fn header(&self, name: &str) -> Option<Option<&Bytes>> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_ref())
    }
}

/// A row that cannot be published as a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("outbox row id={} at commit LSN {} (index {}) cannot be published: {reason}", .id.as_deref().unwrap_or("<unknown>"), .position.commit_lsn, .position.index)]
pub struct MappingError {
    pub id: Option<String>,
    pub position: SourcePosition,
    pub reason: String,
}

pub mod columns;
pub mod template;

pub use columns::{ColumnNames, HeaderColumn, Role, TableColumn, TRACEPARENT};
pub use template::{validate_topic_name, TemplateError, TopicTemplate};

/// A key or value column: where it sits and whether its text form is a bytea's hex.
#[derive(Debug, Clone, Copy)]
struct Field {
    index: usize,
    bytea: bool,
    /// The column's media type, when it has one.
    content_type: Option<&'static str>,
}

/// Where each outbox column sits in one table's rows.
#[derive(Debug, Clone)]
struct Layout {
    id: Option<usize>,
    aggregate_type: Option<usize>,
    aggregate_id: Option<Field>,
    event_type: Option<usize>,
    payload: Field,
    headers: Option<usize>,
    /// Columns carried as headers (`traceparent` always, `--header-column`s, others with
    /// the Debezium preset), with their header name and how their values are written.
    header_columns: Vec<(usize, String, Rendering)>,
    /// The column of each placeholder of the topic template, in order.
    topic_columns: Vec<(usize, String)>,
}

/// Maps inserts to events, remembering each table's layout from its Relation message.
#[derive(Debug)]
pub struct Mapper {
    template: TopicTemplate,
    names: ColumnNames,
    source: Bytes,
    /// The replay run's name: records say so instead of carrying source positions.
    replay: Option<Bytes>,
    /// Keyed by table OID; an `Err` says which column the table lacks.
    layouts: HashMap<u32, Result<Layout, String>>,
}

impl Mapper {
    /// `source` is the value of every record's `outbox.source` header.
    pub fn new(template: TopicTemplate, names: ColumnNames, source: &str) -> Self {
        Mapper {
            template,
            names,
            source: Bytes::copy_from_slice(source.as_bytes()),
            replay: None,
            layouts: HashMap::new(),
        }
    }

    /// Records of a replay named `run`: an `outbox.replay` header instead of the source and
    /// position headers, so that the exactly-once fence never takes a replayed record for
    /// one of the stream's.
    pub fn replaying(mut self, run: &str) -> Self {
        self.replay = Some(Bytes::copy_from_slice(run.as_bytes()));
        self
    }

    /// Learns (or relearns, after a schema change) a table's column positions.
    pub fn relation(&mut self, relation: &Relation) {
        let layout = self.layout(relation);
        self.layouts.insert(relation.id, layout);
    }

    fn layout(&self, relation: &Relation) -> Result<Layout, String> {
        let find = |name: &str| relation.columns.iter().position(|column| column.name == name);
        let require = |name: &str, what: &str| {
            find(name).ok_or_else(|| {
                format!(
                    "table {}.{} has no column {name:?} ({what}); only outbox tables may be in the publication",
                    relation.namespace, relation.name
                )
            })
        };
        let role = |role: Role| -> Result<Option<usize>, String> {
            self.names
                .column(role)
                .map(|name| require(name, &format!("mapped as {role}")))
                .transpose()
        };
        let field = |index: usize| Field {
            index,
            bytea: relation.columns[index].type_oid == columns::BYTEA_OID,
            content_type: columns::content_type(relation.columns[index].type_oid),
        };
        let names = &self.names;
        let rendering = |index: usize| {
            let column = &relation.columns[index];
            if names.debezium_values {
                crate::debezium_values::rendering(column.type_oid, column.type_modifier)
            } else {
                Rendering::Text
            }
        };
        let mut header_columns = Vec::new();
        for header in &names.header_columns {
            let index = require(&header.column, "named by --header-column")?;
            header_columns.push((index, header.header.clone(), rendering(index)));
        }
        for (index, column) in relation.columns.iter().enumerate() {
            let extra = names.extra_columns_as_headers && !names.is_known(&column.name);
            let traced = column.name == TRACEPARENT && !names.header_columns.iter().any(|h| h.column == TRACEPARENT);
            if extra || traced {
                header_columns.push((index, column.name.clone(), rendering(index)));
            }
        }
        let mut topic_columns = Vec::new();
        for segment in self.template.segments() {
            let name = match segment {
                template::Segment::Literal(_) => continue,
                template::Segment::Column(name) => name.as_str(),
                template::Segment::Role(role) => names.column(*role).ok_or_else(|| {
                    format!("the topic template uses {{{role}}}, and the mapping has no {role} column")
                })?,
            };
            topic_columns.push((require(name, "named in the topic template")?, name.to_owned()));
        }
        Ok(Layout {
            id: role(Role::Id)?,
            aggregate_type: role(Role::AggregateType)?,
            aggregate_id: role(Role::AggregateId)?.map(field),
            event_type: role(Role::EventType)?,
            payload: field(require(&names.payload, "mapped as payload")?),
            // The default table's headers column is optional.
            headers: names.headers.as_deref().and_then(find),
            header_columns,
            topic_columns,
        })
    }

    /// Builds the record for one inserted row.
    pub fn map(&self, insert: &Insert, position: SourcePosition) -> Result<OutboxEvent, MappingError> {
        let fail = |id: Option<String>, reason: String| MappingError { id, position, reason };
        let layout = match self.layouts.get(&insert.relation_id) {
            Some(Ok(layout)) => layout,
            Some(Err(reason)) => return Err(fail(None, reason.clone())),
            None => {
                return Err(fail(
                    None,
                    format!(
                        "insert into table OID {} arrived before its Relation message",
                        insert.relation_id
                    ),
                ))
            }
        };
        let value = |index: usize| -> Result<Option<&Bytes>, String> {
            match insert.tuple.get(index) {
                Some(Value::Text(bytes)) => Ok(Some(bytes)),
                Some(Value::Null) => Ok(None),
                Some(Value::Binary(_)) => Err("binary column values are not supported".into()),
                Some(Value::UnchangedToast) => Err("an insert carried an unchanged TOAST value".into()),
                None => Err(format!(
                    "the row has {} columns, fewer than its table",
                    insert.tuple.len()
                )),
            }
        };
        let text = |index: usize, name: &str| -> Result<&str, String> {
            let bytes = value(index)?.ok_or_else(|| format!("column {name:?} is NULL"))?;
            std::str::from_utf8(bytes).map_err(|_| format!("column {name:?} is not UTF-8"))
        };
        let bytes_of = |field: Field, name: &str| -> Result<Option<Bytes>, String> {
            match value(field.index)? {
                Some(text) if field.bytea => columns::decode_bytea(text)
                    .map(|bytes| Some(Bytes::from(bytes)))
                    .map_err(|reason| format!("column {name:?}: {reason}")),
                other => Ok(other.cloned()),
            }
        };
        let names = &self.names;
        let column_name = |role: Role| names.column(role).unwrap_or_default();

        let id = match layout.id {
            Some(index) => text(index, column_name(Role::Id))
                .map_err(|reason| fail(None, reason))?
                .to_owned(),
            // A table without an id column: the position, the same on every replay.
            None => format!("{}:{}", position.commit_lsn, position.index),
        };
        let with_id = |reason: String| fail(Some(id.clone()), reason);
        let aggregate_type = layout
            .aggregate_type
            .map(|index| text(index, column_name(Role::AggregateType)))
            .transpose()
            .map_err(with_id)?;
        let event_type = layout
            .event_type
            .map(|index| text(index, column_name(Role::EventType)))
            .transpose()
            .map_err(with_id)?;
        let key = match layout.aggregate_id {
            None => None,
            Some(field) => Some(
                bytes_of(field, column_name(Role::AggregateId))
                    .map_err(with_id)?
                    .ok_or_else(|| with_id(format!("column {:?} is NULL", column_name(Role::AggregateId))))?,
            ),
        };
        let payload = match bytes_of(layout.payload, &names.payload).map_err(with_id)? {
            Some(payload) => Some(payload),
            None if names.null_payload_is_tombstone => None,
            None => return Err(with_id(format!("column {:?} is NULL", names.payload))),
        };
        let mut placeholders = layout.topic_columns.iter();
        let topic = self
            .template
            .render(|_| {
                let (index, name) = placeholders
                    .next()
                    .ok_or_else(|| "the topic template changed after the table was read".to_owned())?;
                text(*index, name).map_err(|reason| format!("{reason} (it names the topic)"))
            })
            .map_err(with_id)?;

        let mut headers = Vec::with_capacity(6 + layout.header_columns.len());
        if let Some(index) = layout.headers {
            if let Some(json) = value(index).map_err(with_id)? {
                extra_headers(json, &mut headers).map_err(with_id)?;
            }
        }
        for (index, name, rendering) in &layout.header_columns {
            match value(*index).map_err(with_id)? {
                Some(text) => headers.push((name.clone().into(), Some(header_value(*rendering, text)))),
                // Debezium's EventRouter places a NULL extra column as a header with a
                // null value; a NULL traceparent means no trace, so no header.
                None if name != TRACEPARENT => headers.push((name.clone().into(), None)),
                None => {}
            }
        }
        self.standard_headers(&mut headers, &id, event_type, aggregate_type, position);

        Ok(OutboxEvent {
            id,
            topic,
            key,
            payload,
            headers,
            position,
            content_type: layout.payload.content_type,
        })
    }
}

/// A column's value as a header: PostgreSQL's text, or as Debezium writes it (a value
/// that cannot be read that way keeps PostgreSQL's text).
fn header_value(rendering: Rendering, text: &Bytes) -> Bytes {
    if rendering == Rendering::Text {
        return text.clone();
    }
    std::str::from_utf8(text)
        .ok()
        .and_then(|text| crate::debezium_values::render(rendering, text))
        .map_or_else(|| text.clone(), Bytes::from)
}

/// The prefix of logical decoding messages that are outbox events (table-less mode).
pub const MESSAGE_PREFIX: &str = "outbox";

/// The documented JSON shape of a table-less event, written with
/// `pg_logical_emit_message(true, 'outbox', '{...}')` inside the business transaction.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageEvent<'a> {
    /// Optional; defaults to `<commit LSN>:<index>`, which is the same on every replay.
    id: Option<String>,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    /// Any JSON; published byte for byte as written.
    #[serde(borrow)]
    payload: &'a serde_json::value::RawValue,
    /// Optional object of extra headers, as the table's `headers` column.
    #[serde(borrow)]
    headers: Option<&'a serde_json::value::RawValue>,
}

impl Mapper {
    /// Builds the record for a table-less event (a transactional logical message with the
    /// prefix [`MESSAGE_PREFIX`]), with the same topic, key, value and headers a table row
    /// with these values would get.
    pub fn map_message(&self, content: &[u8], position: SourcePosition) -> Result<OutboxEvent, MappingError> {
        let fail = |reason: String| MappingError {
            id: None,
            position,
            reason,
        };
        let message: MessageEvent<'_> = serde_json::from_slice(content)
            .map_err(|e| fail(format!("logical message is not the outbox JSON shape: {e}")))?;
        let id = message
            .id
            .unwrap_or_else(|| format!("{}:{}", position.commit_lsn, position.index));
        let with_id = |reason: String| MappingError {
            id: Some(id.clone()),
            position,
            reason,
        };
        let topic = self
            .template
            .render(|segment| match segment {
                template::Segment::Role(Role::AggregateType) => Ok(&message.aggregate_type),
                template::Segment::Role(Role::EventType) => Ok(&message.event_type),
                template::Segment::Role(Role::AggregateId) => Ok(&message.aggregate_id),
                template::Segment::Role(Role::Id) => Ok(&id),
                other => Err(format!(
                    "the topic template names {other:?}, which a logical message does not have"
                )),
            })
            .map_err(with_id)?;
        let mut headers = Vec::with_capacity(6);
        if let Some(extra) = message.headers {
            extra_headers(extra.get().as_bytes(), &mut headers).map_err(with_id)?;
        }
        self.standard_headers(
            &mut headers,
            &id,
            Some(&message.event_type),
            Some(&message.aggregate_type),
            position,
        );
        Ok(OutboxEvent {
            key: Some(Bytes::from(message.aggregate_id)),
            payload: Some(Bytes::copy_from_slice(message.payload.get().as_bytes())),
            topic,
            id,
            headers,
            position,
            content_type: Some(JSON),
        })
    }

    fn standard_headers(
        &self,
        headers: &mut Headers,
        id: &str,
        event_type: Option<&str>,
        aggregate_type: Option<&str>,
        position: SourcePosition,
    ) {
        headers.push((HEADER_ID.into(), Some(Bytes::copy_from_slice(id.as_bytes()))));
        if let Some(event_type) = event_type {
            headers.push((
                HEADER_EVENT_TYPE.into(),
                Some(Bytes::copy_from_slice(event_type.as_bytes())),
            ));
        }
        if let Some(aggregate_type) = aggregate_type {
            headers.push((
                HEADER_AGGREGATE_TYPE.into(),
                Some(Bytes::copy_from_slice(aggregate_type.as_bytes())),
            ));
        }
        if let Some(run) = &self.replay {
            headers.push((HEADER_REPLAY.into(), Some(run.clone())));
            return;
        }
        headers.push((
            HEADER_COMMIT_LSN.into(),
            Some(Bytes::from(position.commit_lsn.to_string())),
        ));
        headers.push((HEADER_TX_INDEX.into(), Some(Bytes::from(position.index.to_string()))));
        headers.push((HEADER_SOURCE.into(), Some(self.source.clone())));
    }

    /// What can still be read from a row that could not be mapped: its key and payload
    /// (for the dead-letter record).
    pub fn salvage(&self, insert: &Insert) -> (Option<Bytes>, Option<Bytes>) {
        let Some(Ok(layout)) = self.layouts.get(&insert.relation_id) else {
            return (None, None);
        };
        let text = |index: usize| match insert.tuple.get(index) {
            Some(Value::Text(bytes)) => Some(bytes.clone()),
            _ => None,
        };
        (
            layout.aggregate_id.and_then(|field| text(field.index)),
            text(layout.payload.index),
        )
    }
}

/// Each key of the `headers` JSON object becomes a header: strings as they are, other
/// JSON values as their JSON text, `null` as a header without a value.
fn extra_headers(json: &[u8], headers: &mut Headers) -> Result<(), String> {
    let parsed: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("column \"headers\" is not JSON: {e}"))?;
    let serde_json::Value::Object(map) = parsed else {
        return Err("column \"headers\" must be a JSON object of header names to values".into());
    };
    for (name, value) in map {
        let value = match value {
            serde_json::Value::Null => None,
            serde_json::Value::String(text) => Some(Bytes::from(text)),
            other => Some(Bytes::from(other.to_string())),
        };
        headers.push((name.into(), value));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::pgoutput::build;
    use crate::postgres::pgoutput::{decode, Message};

    const COLUMNS: [&str; 7] = [
        "id",
        "aggregate_type",
        "aggregate_id",
        "event_type",
        "payload",
        "headers",
        "created_at",
    ];

    fn mapper() -> Mapper {
        let mut mapper = Mapper::new(
            TopicTemplate::parse("outbox.event.{aggregate_type}").unwrap_or_else(|e| panic!("{e}")),
            ColumnNames::default(),
            "app/outbox_relay",
        );
        let Ok(Message::Relation(relation)) = decode(&Bytes::from(build::relation(1, "outbox", &COLUMNS))) else {
            panic!("relation did not decode");
        };
        mapper.relation(&relation);
        mapper
    }

    fn insert(values: &[Option<&str>]) -> Insert {
        match decode(&Bytes::from(build::insert(1, values))) {
            Ok(Message::Insert(insert)) => insert,
            other => panic!("insert did not decode: {other:?}"),
        }
    }

    const POSITION: SourcePosition = SourcePosition {
        commit_lsn: Lsn(0x1_0000_00A0),
        index: 3,
    };

    #[test]
    fn maps_topic_key_value_and_headers() {
        let row = insert(&[
            Some("0b5c"),
            Some("order"),
            Some("o-1"),
            Some("OrderPlaced"),
            Some(r#"{"total": 5}"#),
            Some(r#"{"traceparent": "00-ab", "n": 1, "gone": null}"#),
            Some("2026-01-01"),
        ]);
        let event = mapper().map(&row, POSITION).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event.topic, "outbox.event.order");
        assert_eq!(event.key, Some(Bytes::from_static(b"o-1")));
        assert_eq!(event.payload, Some(Bytes::from_static(br#"{"total": 5}"#)));
        assert_eq!(event.header("id"), Some(Some(&Bytes::from_static(b"0b5c"))));
        assert_eq!(
            event.header("event_type"),
            Some(Some(&Bytes::from_static(b"OrderPlaced")))
        );
        assert_eq!(
            event.header("aggregate_type"),
            Some(Some(&Bytes::from_static(b"order")))
        );
        assert_eq!(
            event.header("outbox.commit_lsn"),
            Some(Some(&Bytes::from_static(b"1/A0")))
        );
        assert_eq!(event.header("outbox.tx_index"), Some(Some(&Bytes::from_static(b"3"))));
        assert_eq!(
            event.header("outbox.source"),
            Some(Some(&Bytes::from_static(b"app/outbox_relay")))
        );
        assert_eq!(event.header("traceparent"), Some(Some(&Bytes::from_static(b"00-ab"))));
        assert_eq!(event.header("n"), Some(Some(&Bytes::from_static(b"1"))));
        assert_eq!(event.header("gone"), Some(None));
    }

    #[test]
    fn the_debezium_preset_writes_typed_columns_as_debezium_does() {
        let mut mapper = Mapper::new(
            TopicTemplate::parse("outbox.event.{aggregate_type}").unwrap_or_else(|e| panic!("{e}")),
            ColumnNames::debezium(),
            "app/outbox_relay",
        );
        let column = |name: &str, type_oid: u32| crate::postgres::pgoutput::Column {
            flags: 0,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        };
        mapper.relation(&Relation {
            id: 7,
            namespace: "public".into(),
            name: "outboxevent".into(),
            replica_identity: b'd',
            columns: vec![
                column("id", 2950),
                column("aggregatetype", 25),
                column("aggregateid", 25),
                column("type", 25),
                column("payload", 3802),
                column("placed_at", 1184),
                column("urgent", 16),
                column("tenant", 25),
            ],
        });
        let Ok(Message::Insert(row)) = decode(&Bytes::from(build::insert(
            7,
            &[
                Some("0b5c"),
                Some("order"),
                Some("o-1"),
                Some("OrderPlaced"),
                Some("{}"),
                Some("2026-11-29 17:00:00.5+01"),
                Some("t"),
                Some("acme"),
            ],
        ))) else {
            panic!("insert did not decode");
        };
        let event = mapper.map(&row, POSITION).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            event.header("placed_at"),
            Some(Some(&Bytes::from_static(b"2026-11-29T16:00:00.500000Z")))
        );
        assert_eq!(event.header("urgent"), Some(Some(&Bytes::from_static(b"true"))));
        assert_eq!(event.header("tenant"), Some(Some(&Bytes::from_static(b"acme"))));
    }

    #[test]
    fn columns_are_found_by_name_whatever_their_order() {
        let mut mapper = mapper();
        let reordered = [
            "created_at",
            "payload",
            "event_type",
            "aggregate_id",
            "aggregate_type",
            "id",
            "extra",
        ];
        let Ok(Message::Relation(relation)) = decode(&Bytes::from(build::relation(1, "outbox", &reordered))) else {
            panic!("relation did not decode");
        };
        mapper.relation(&relation);
        let row = insert(&[None, Some("{}"), Some("E"), Some("k"), Some("a"), Some("i"), Some("x")]);
        let event = mapper.map(&row, POSITION).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((event.id.as_str(), event.topic.as_str()), ("i", "outbox.event.a"));
    }

    #[test]
    fn null_required_values_name_the_row() {
        let row = insert(&[Some("id-9"), Some("order"), None, Some("E"), Some("{}"), None, None]);
        let error = mapper()
            .map(&row, POSITION)
            .err()
            .unwrap_or_else(|| panic!("mapped a NULL key"));
        assert_eq!(error.id.as_deref(), Some("id-9"));
        let message = error.to_string();
        assert!(
            message.contains("id=id-9") && message.contains("1/A0") && message.contains("aggregate_id"),
            "{message}"
        );
    }

    #[test]
    fn illegal_topic_names_and_bad_headers_are_errors() {
        let row = insert(&[
            Some("i"),
            Some("no spaces"),
            Some("k"),
            Some("E"),
            Some("{}"),
            None,
            None,
        ]);
        assert!(mapper().map(&row, POSITION).is_err());
        let row = insert(&[
            Some("i"),
            Some("a"),
            Some("k"),
            Some("E"),
            Some("{}"),
            Some("[1]"),
            None,
        ]);
        assert!(mapper().map(&row, POSITION).is_err());
    }

    #[test]
    fn a_table_without_outbox_columns_is_reported_by_name() {
        let mut mapper = mapper();
        let Ok(Message::Relation(relation)) = decode(&Bytes::from(build::relation(2, "orders", &["id"]))) else {
            panic!("relation did not decode");
        };
        mapper.relation(&relation);
        let row = match decode(&Bytes::from(build::insert(2, &[Some("1")]))) {
            Ok(Message::Insert(insert)) => insert,
            other => panic!("{other:?}"),
        };
        let error = mapper.map(&row, POSITION).err().unwrap_or_else(|| panic!("mapped"));
        assert!(error.reason.contains("public.orders"), "{error}");
    }

    #[test]
    fn table_less_messages_map_like_rows() {
        let content = br#"{"aggregate_type": "order", "aggregate_id": "o-1", "event_type": "Placed",
                            "payload": {"total":  5}, "headers": {"traceparent": "00-ab"}}"#;
        let event = mapper()
            .map_message(content, POSITION)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event.topic, "outbox.event.order");
        assert_eq!(event.key, Some(Bytes::from_static(b"o-1")));
        assert_eq!(
            event.payload,
            Some(Bytes::from_static(br#"{"total":  5}"#)),
            "payload kept byte for byte"
        );
        assert_eq!(event.id, "1/A0:3", "a missing id is derived from the position");
        assert!(event
            .headers
            .iter()
            .any(|(k, v)| k == "traceparent" && v.as_deref() == Some(&b"00-ab"[..])));
        assert!(mapper().map_message(b"{}", POSITION).is_err());
        assert!(mapper().map_message(b"not json", POSITION).is_err());
    }

    fn column(name: &str, type_oid: u32) -> crate::postgres::pgoutput::Column {
        crate::postgres::pgoutput::Column {
            flags: 0,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        }
    }

    fn row(relation_id: u32, values: &[Option<&str>]) -> Insert {
        match decode(&Bytes::from(build::insert(relation_id, values))) {
            Ok(Message::Insert(insert)) => insert,
            other => panic!("insert did not decode: {other:?}"),
        }
    }

    #[test]
    fn the_seeds_table_maps_without_aggregate_columns() {
        let mut names = ColumnNames::default();
        for role in [Role::AggregateType, Role::AggregateId, Role::Headers] {
            names = names.with_column(role, None).unwrap_or_else(|e| panic!("{e}"));
        }
        let template = TopicTemplate::parse("shop.{event_type}").unwrap_or_else(|e| panic!("{e}"));
        let mut mapper = Mapper::new(template, names, "app/outbox_relay");
        mapper.relation(&Relation {
            id: 9,
            namespace: "public".into(),
            name: "outbox".into(),
            replica_identity: b'd',
            columns: vec![
                column("id", 23),
                column("event_type", 25),
                column("payload", 25),
                column("status", 25),
                column("created_at", 1114),
            ],
        });
        let insert = row(
            9,
            &[
                Some("42"),
                Some("OrderPlaced"),
                Some("plain text, not JSON"),
                Some("PENDING"),
                None,
            ],
        );
        let event = mapper.map(&insert, POSITION).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event.topic, "shop.OrderPlaced");
        assert_eq!(event.key, None);
        assert_eq!(event.routing_key(), b"42", "a keyless event is routed by its id");
        assert_eq!(event.payload, Some(Bytes::from_static(b"plain text, not JSON")));
        assert_eq!(event.header("id"), Some(Some(&Bytes::from_static(b"42"))));
        assert_eq!(event.header("aggregate_type"), None);
        assert_eq!(
            event.header("status"),
            None,
            "other columns are not headers unless named"
        );
    }

    #[test]
    fn business_keys_bytea_values_header_columns_and_column_placeholders() {
        let mut names = ColumnNames::default()
            .with_column(Role::AggregateId, Some("order_id".into()))
            .and_then(|n| n.with_column(Role::Payload, Some("body".into())))
            .and_then(|n| n.with_column(Role::AggregateType, None))
            .and_then(|n| n.with_column(Role::Id, Some("event_id".into())))
            .unwrap_or_else(|e| panic!("{e}"));
        names.header_columns.push(HeaderColumn {
            column: "tenant".into(),
            header: "x-tenant".into(),
        });
        let template = TopicTemplate::parse("{tenant}.{event_type}").unwrap_or_else(|e| panic!("{e}"));
        let mut mapper = Mapper::new(template, names, "app/outbox_relay");
        mapper.relation(&Relation {
            id: 3,
            namespace: "billing".into(),
            name: "outbox_event".into(),
            replica_identity: b'd',
            columns: vec![
                column("event_id", 2950),
                column("order_id", 20),
                column("event_type", 25),
                column("body", columns::BYTEA_OID),
                column("tenant", 25),
            ],
        });
        let insert = row(
            3,
            &[Some("0b5c"), Some("1001"), Some("Paid"), Some("\\x00ff"), Some("acme")],
        );
        let event = mapper.map(&insert, POSITION).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event.topic, "acme.Paid");
        assert_eq!(event.key, Some(Bytes::from_static(b"1001")));
        assert_eq!(event.payload, Some(Bytes::from_static(&[0, 255])));
        assert_eq!(event.header("x-tenant"), Some(Some(&Bytes::from_static(b"acme"))));
        assert_eq!(event.id, "0b5c");
        let null_topic = row(3, &[Some("0b5d"), Some("1001"), Some("Paid"), Some("\\x00"), None]);
        let error = mapper
            .map(&null_topic, POSITION)
            .err()
            .unwrap_or_else(|| panic!("mapped"));
        assert!(
            error.reason.contains("tenant") && error.reason.contains("topic"),
            "{error}"
        );
    }

    #[test]
    fn a_table_without_an_id_column_gets_the_position_as_id() {
        let names = ColumnNames::default()
            .with_column(Role::Id, None)
            .unwrap_or_else(|e| panic!("{e}"));
        let template = TopicTemplate::parse("outbox.event.{aggregate_type}").unwrap_or_else(|e| panic!("{e}"));
        let mut mapper = Mapper::new(template, names, "app/outbox_relay");
        let Ok(Message::Relation(relation)) = decode(&Bytes::from(build::relation(1, "outbox", &COLUMNS))) else {
            panic!("relation did not decode");
        };
        mapper.relation(&relation);
        let insert = insert(&[
            Some("ignored"),
            Some("order"),
            Some("o-1"),
            Some("E"),
            Some("{}"),
            None,
            None,
        ]);
        let event = mapper.map(&insert, POSITION).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event.id, "1/A0:3");
    }
}
