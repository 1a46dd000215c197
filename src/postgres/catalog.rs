//! The publication's tables and their columns, read from the catalogs, and rows read
//! with plain SQL in the form the replication stream carries them.
//!
//! `check`, `run` (before streaming), backfills and replays see a table through this
//! module, so a mapping is validated against exactly the columns pgoutput will send (a
//! publication's column list included) and a row read by SQL maps to the same record as
//! the same row streamed: every value is cast to `text`, which is the type's output
//! function, as pgoutput's text format is.

use bytes::Bytes;
use tokio_postgres::Client;

use crate::outbox::TableColumn;
use crate::postgres::pgoutput::{Column, Insert, Relation, Value};

/// A table of the publication.
#[derive(Debug, Clone)]
pub struct PublishedTable {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// In attribute order, as pgoutput sends them.
    pub columns: Vec<TableColumn>,
}

impl PublishedTable {
    /// `schema.table`, quoted where SQL needs it.
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_identifier(&self.schema), quote_identifier(&self.name))
    }

    /// `schema.table` for messages.
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// The Relation message the stream would send for this table.
    pub fn relation(&self) -> Relation {
        Relation {
            id: self.oid,
            namespace: self.schema.clone(),
            name: self.name.clone(),
            replica_identity: b'd',
            columns: self
                .columns
                .iter()
                .map(|column| Column {
                    flags: 0,
                    name: column.name.clone(),
                    type_oid: column.type_oid,
                    type_modifier: column.type_modifier,
                })
                .collect(),
        }
    }

    /// `"a"::text, "b"::text, ...`: the columns as the stream carries them, prefixed by
    /// `alias.` when given.
    pub fn text_select_list(&self, alias: Option<&str>) -> String {
        let prefix = alias.map(|a| format!("{a}.")).unwrap_or_default();
        self.columns
            .iter()
            .map(|column| format!("{prefix}{}::text", quote_identifier(&column.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn column(&self, name: &str) -> Option<&TableColumn> {
        self.columns.iter().find(|column| column.name == name)
    }
}

/// Quotes an identifier the way `quote_ident` does, always.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The tables `publication` publishes, with the columns it sends (a column list, from
/// PostgreSQL 15, narrows them; generated columns are not sent).
pub async fn publication_tables(
    client: &Client,
    publication: &str,
) -> Result<Vec<PublishedTable>, tokio_postgres::Error> {
    // attnames exists from PostgreSQL 15 on: read through jsonb so that 14 works too.
    let rows = client
        .query(
            "SELECT c.oid, p.schemaname::text, p.tablename::text,
                    a.attname::text, a.atttypid, a.atttypmod,
                    format_type(a.atttypid, a.atttypmod),
                    format_type(coalesce(nullif(t.typbasetype, 0), a.atttypid), NULL)
               FROM pg_publication_tables p
               JOIN pg_namespace n ON n.nspname = p.schemaname
               JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                   AND a.attgenerated = ''
               JOIN pg_type t ON t.oid = a.atttypid
              WHERE p.pubname = $1
                AND (to_jsonb(p) -> 'attnames' IS NULL OR jsonb_typeof(to_jsonb(p) -> 'attnames') = 'null'
                     OR (to_jsonb(p) -> 'attnames') ? a.attname::text)
              ORDER BY p.schemaname, p.tablename, a.attnum",
            &[&publication],
        )
        .await?;
    let mut tables: Vec<PublishedTable> = Vec::new();
    for row in rows {
        let oid: u32 = row.get(0);
        if tables.last().is_none_or(|table| table.oid != oid) {
            tables.push(PublishedTable {
                oid,
                schema: row.get(1),
                name: row.get(2),
                columns: Vec::new(),
            });
        }
        if let Some(table) = tables.last_mut() {
            table.columns.push(TableColumn {
                name: row.get(3),
                type_oid: row.get(4),
                type_modifier: row.get(5),
                type_name: row.get(6),
                base_type: row.get(7),
            });
        }
    }
    Ok(tables)
}

/// One row as the stream would carry it, from a query that selected
/// [`PublishedTable::text_select_list`] starting at column `first`.
pub fn insert_from_row(table: &PublishedTable, row: &tokio_postgres::Row, first: usize) -> Insert {
    let tuple = (0..table.columns.len())
        .map(|i| match row.get::<_, Option<&str>>(first + i) {
            Some(text) => Value::Text(Bytes::copy_from_slice(text.as_bytes())),
            None => Value::Null,
        })
        .collect();
    Insert {
        relation_id: table.oid,
        tuple,
    }
}

/// Makes this session print values as the walsender does: the server's configured
/// formats, not the ones a client library asks for.
pub async fn use_server_formats(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(
            "SET DateStyle TO DEFAULT; SET TimeZone TO DEFAULT; SET IntervalStyle TO DEFAULT;
             SET extra_float_digits TO DEFAULT; SET bytea_output TO DEFAULT",
        )
        .await
}

/// Some row of `table` (whichever a plain scan meets first), for `check` to show.
pub async fn sample_row(client: &Client, table: &PublishedTable) -> Result<Option<Insert>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {} FROM {} LIMIT 1",
        table.text_select_list(None),
        table.qualified()
    );
    let row = client.query_opt(&sql, &[]).await?;
    Ok(row.map(|row| insert_from_row(table, &row, 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("outbox"), "\"outbox\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }
}
