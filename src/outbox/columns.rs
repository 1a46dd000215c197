//! Which column of the user's table plays which part of a record.
//!
//! The relay's own table has `id, aggregate_type, aggregate_id, event_type, payload,
//! headers`; an existing outbox rarely does. `--column ROLE=COLUMN` maps a role to another
//! column, `--column ROLE=` says the table has no such column, and `--header-column`
//! carries any further column as a header. [`ColumnNames::validate`] checks a mapping
//! against a table's columns and types before anything is published, so that a typo is a
//! configuration error naming the column, not a dead letter per row.

use std::fmt;

/// A part of a record that a column can play.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The event's id: the `id` header, and how backfills and replays find rows.
    Id,
    /// The `aggregate_type` header and the default topic.
    AggregateType,
    /// The record key (per-key order and partitioning).
    AggregateId,
    /// The `event_type` header.
    EventType,
    /// The record value, published byte for byte.
    Payload,
    /// A JSON object column whose keys become headers.
    Headers,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Id,
        Role::AggregateType,
        Role::AggregateId,
        Role::EventType,
        Role::Payload,
        Role::Headers,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Id => "id",
            Role::AggregateType => "aggregate_type",
            Role::AggregateId => "aggregate_id",
            Role::EventType => "event_type",
            Role::Payload => "payload",
            Role::Headers => "headers",
        }
    }

    /// The role a topic-template placeholder names, with Debezium's spellings.
    pub fn from_placeholder(name: &str) -> Option<Role> {
        match name {
            "aggregatetype" => Some(Role::AggregateType),
            "aggregateid" => Some(Role::AggregateId),
            "type" => Some(Role::EventType),
            "payload" | "headers" => None,
            other => Role::ALL.into_iter().find(|role| role.name() == other),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Role::ALL.into_iter().find(|role| role.name() == text).ok_or_else(|| {
            let names: Vec<&str> = Role::ALL.iter().map(|role| role.name()).collect();
            format!("unknown role {text:?}; roles are {}", names.join(", "))
        })
    }
}

/// A column published as a header: `--header-column COLUMN[=HEADER]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderColumn {
    pub column: String,
    pub header: String,
}

/// The column each role reads (`None`: the table has no such column), and which other
/// columns become headers.
#[derive(Debug, Clone)]
pub struct ColumnNames {
    pub id: Option<String>,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub event_type: Option<String>,
    pub payload: String,
    pub headers: Option<String>,
    /// Columns named by `--header-column`.
    pub header_columns: Vec<HeaderColumn>,
    /// Every column not named above (and not `created_at`) becomes a header with its text
    /// value, as Debezium's `table.fields.additional.placement` does.
    pub extra_columns_as_headers: bool,
    /// Column values in headers are written as Debezium's converters write them
    /// ([`crate::debezium_values`]); otherwise as PostgreSQL's text form.
    pub debezium_values: bool,
    /// A NULL payload becomes a record with a null value (a tombstone, which deletes the
    /// key in a compacted topic), as Debezium's EventRouter does; otherwise it is an error.
    pub null_payload_is_tombstone: bool,
}

/// A column whose value, when present, is carried into the header of the same name, so
/// that traces continue across the relay (W3C Trace Context).
pub const TRACEPARENT: &str = "traceparent";

impl Default for ColumnNames {
    fn default() -> Self {
        ColumnNames {
            id: Some("id".into()),
            aggregate_type: Some("aggregate_type".into()),
            aggregate_id: Some("aggregate_id".into()),
            event_type: Some("event_type".into()),
            payload: "payload".into(),
            headers: Some("headers".into()),
            header_columns: Vec::new(),
            extra_columns_as_headers: false,
            debezium_values: false,
            null_payload_is_tombstone: false,
        }
    }
}

impl ColumnNames {
    /// The column names of Debezium's Outbox Event Router (`aggregatetype`, `aggregateid`,
    /// `type`, `payload`), with any further columns as headers.
    pub fn debezium() -> Self {
        ColumnNames {
            aggregate_type: Some("aggregatetype".into()),
            aggregate_id: Some("aggregateid".into()),
            event_type: Some("type".into()),
            extra_columns_as_headers: true,
            debezium_values: true,
            null_payload_is_tombstone: true,
            ..ColumnNames::default()
        }
    }

    /// Applies `--column ROLE=COLUMN` (an empty column: the table has none).
    pub fn with_column(mut self, role: Role, column: Option<String>) -> Result<Self, String> {
        match role {
            Role::Id => self.id = column,
            Role::AggregateType => self.aggregate_type = column,
            Role::AggregateId => self.aggregate_id = column,
            Role::EventType => self.event_type = column,
            Role::Headers => self.headers = column,
            Role::Payload => {
                self.payload = column.ok_or_else(|| {
                    "--column payload= : every event needs a value; name the column that holds it".to_owned()
                })?
            }
        }
        Ok(self)
    }

    /// The column playing `role`, if the table has one.
    pub fn column(&self, role: Role) -> Option<&str> {
        match role {
            Role::Id => self.id.as_deref(),
            Role::AggregateType => self.aggregate_type.as_deref(),
            Role::AggregateId => self.aggregate_id.as_deref(),
            Role::EventType => self.event_type.as_deref(),
            Role::Payload => Some(&self.payload),
            Role::Headers => self.headers.as_deref(),
        }
    }

    /// Whether `column` has a part already (a role or a header of its own), so that the
    /// Debezium preset does not place it a second time.
    pub fn is_known(&self, column: &str) -> bool {
        Role::ALL.iter().any(|role| self.column(*role) == Some(column))
            || self.header_columns.iter().any(|h| h.column == column)
            || column == "created_at"
    }

    /// Checks this mapping and `template` against a table's columns: every named column
    /// exists, and value and key columns have types that can be published as bytes.
    pub fn validate(
        &self,
        table: &str,
        columns: &[TableColumn],
        template: &super::TopicTemplate,
    ) -> Result<(), String> {
        let find = |name: &str| columns.iter().find(|column| column.name == name);
        let missing = |name: &str, what: &str| {
            let mut names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
            names.sort_unstable();
            format!(
                "table {table} has no column {name:?} ({what}); its columns are {}",
                names.join(", ")
            )
        };
        for role in Role::ALL {
            let Some(name) = self.column(role) else { continue };
            // The default table's optional headers column may be absent.
            if role == Role::Headers && find(name).is_none() && name == "headers" {
                continue;
            }
            let column = find(name).ok_or_else(|| missing(name, &format!("mapped as {role}")))?;
            let allowed = match role {
                Role::Payload => ColumnType::VALUE,
                Role::AggregateId => ColumnType::KEY,
                Role::Headers => ColumnType::JSON_OBJECT,
                _ => continue,
            };
            if !allowed.contains(&column.base_type.as_str()) {
                return Err(format!(
                    "column {name:?} of table {table} is of type {}, which cannot be the {} ({}); use a column of type {}",
                    column.type_name,
                    role,
                    match role {
                        Role::Payload => "record value",
                        Role::AggregateId => "record key",
                        _ => "headers object",
                    },
                    allowed.join(", ")
                ));
            }
        }
        for header in &self.header_columns {
            find(&header.column).ok_or_else(|| missing(&header.column, "named by --header-column"))?;
        }
        for segment in template.segments() {
            match segment {
                super::template::Segment::Role(role) => {
                    let name = self.column(*role).ok_or_else(|| {
                        format!(
                            "the topic template {:?} uses {{{role}}}, and the mapping has no {role} column (--column {role}=)",
                            template.as_str()
                        )
                    })?;
                    find(name).ok_or_else(|| missing(name, &format!("mapped as {role}")))?;
                }
                super::template::Segment::Column(name) => {
                    find(name).ok_or_else(|| missing(name, &format!("named in the topic template as {{{name}}}")))?;
                }
                super::template::Segment::Literal(_) => {}
            }
        }
        Ok(())
    }
}

/// A table column as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableColumn {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// `format_type` of the column, e.g. `character varying(40)`.
    pub type_name: String,
    /// The type's name with domains resolved to the type they are over, e.g. `text`.
    pub base_type: String,
}

/// The types allowed per role, by base type name.
struct ColumnType;

impl ColumnType {
    const VALUE: &'static [&'static str] = &["jsonb", "json", "text", "character varying", "character", "bytea"];
    const KEY: &'static [&'static str] = &[
        "text",
        "character varying",
        "character",
        "uuid",
        "smallint",
        "integer",
        "bigint",
        "numeric",
        "bytea",
    ];
    const JSON_OBJECT: &'static [&'static str] = &["jsonb", "json", "text"];
}

/// The OID of `bytea`, whose text form (`\x0a0b`) is decoded to its bytes when it is a
/// key or a value.
pub const BYTEA_OID: u32 = 17;

/// The media type of a value column of this type: JSON for json and jsonb, text for the
/// text family, none for bytea (raw bytes) and domains (their type is not looked up).
pub fn content_type(type_oid: u32) -> Option<&'static str> {
    match type_oid {
        114 | 3802 => Some(super::JSON),
        25 | 1043 | 1042 => Some(super::TEXT),
        _ => None,
    }
}

/// Decodes PostgreSQL's hex text form of a bytea (`\x0a0b`).
pub fn decode_bytea(text: &[u8]) -> Result<Vec<u8>, String> {
    let hex = text
        .strip_prefix(b"\\x")
        .ok_or_else(|| "bytea value is not in hex form (set bytea_output = 'hex')".to_owned())?;
    if hex.len() % 2 != 0 {
        return Err("bytea value has an odd number of hex digits".into());
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(format!("bytea value has a non-hex character {:?}", c as char)),
    };
    hex.chunks(2)
        .map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::TopicTemplate;

    fn column(name: &str, type_name: &str) -> TableColumn {
        TableColumn {
            name: name.into(),
            type_oid: 0,
            type_modifier: -1,
            type_name: type_name.into(),
            base_type: type_name.into(),
        }
    }

    /// The seeds' sample table: `outbox(id serial, event_type, payload text, status, created_at)`.
    fn seeds_table() -> Vec<TableColumn> {
        vec![
            column("id", "integer"),
            column("event_type", "text"),
            column("payload", "text"),
            column("status", "text"),
            column("created_at", "timestamp without time zone"),
        ]
    }

    fn seeds_mapping() -> ColumnNames {
        let mut names = ColumnNames::default();
        for role in [Role::AggregateType, Role::AggregateId, Role::Headers] {
            names = names.with_column(role, None).unwrap_or_else(|e| panic!("{e}"));
        }
        names
    }

    fn template(text: &str) -> TopicTemplate {
        TopicTemplate::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_mapping_without_aggregate_columns_fits_the_seeds_table() {
        let result = seeds_mapping().validate("public.outbox", &seeds_table(), &template("shop.{event_type}"));
        assert_eq!(result, Ok(()));
    }

    #[test]
    fn unknown_columns_are_named() {
        let names = seeds_mapping()
            .with_column(Role::EventType, Some("kind".into()))
            .unwrap_or_else(|e| panic!("{e}"));
        let error = names
            .validate("public.outbox", &seeds_table(), &template("shop"))
            .err()
            .unwrap_or_default();
        assert!(error.contains("\"kind\"") && error.contains("event_type"), "{error}");
        let error = seeds_mapping()
            .validate("public.outbox", &seeds_table(), &template("shop.{tenant}"))
            .err()
            .unwrap_or_default();
        assert!(
            error.contains("\"tenant\"") && error.contains("topic template"),
            "{error}"
        );
    }

    #[test]
    fn a_template_role_needs_a_mapped_column() {
        let error = seeds_mapping()
            .validate(
                "public.outbox",
                &seeds_table(),
                &template("outbox.event.{aggregate_type}"),
            )
            .err()
            .unwrap_or_default();
        assert!(error.contains("{aggregate_type}"), "{error}");
    }

    #[test]
    fn key_and_value_types_are_checked() {
        let mut table = seeds_table();
        table.push(column("doc", "jsonb"));
        table.push(column("placed_at", "timestamp with time zone"));
        let key = seeds_mapping()
            .with_column(Role::AggregateId, Some("doc".into()))
            .unwrap_or_else(|e| panic!("{e}"));
        let error = key.validate("t", &table, &template("x")).err().unwrap_or_default();
        assert!(
            error.contains("\"doc\"") && error.contains("jsonb") && error.contains("key"),
            "{error}"
        );
        let value = seeds_mapping()
            .with_column(Role::Payload, Some("placed_at".into()))
            .unwrap_or_else(|e| panic!("{e}"));
        let error = value.validate("t", &table, &template("x")).err().unwrap_or_default();
        assert!(error.contains("\"placed_at\"") && error.contains("value"), "{error}");
        assert!(seeds_mapping().with_column(Role::Payload, None).is_err());
    }

    #[test]
    fn roles_parse_by_name() {
        assert_eq!("aggregate_id".parse::<Role>(), Ok(Role::AggregateId));
        assert!("key".parse::<Role>().is_err());
        assert_eq!(Role::from_placeholder("type"), Some(Role::EventType));
        assert_eq!(Role::from_placeholder("tenant"), None);
    }

    #[test]
    fn bytea_hex_decodes() {
        assert_eq!(decode_bytea(b"\\x00ff10"), Ok(vec![0, 255, 16]));
        assert!(decode_bytea(b"\\x0").is_err());
        assert!(decode_bytea(b"abc").is_err());
    }
}
