//! A backfill's durable record, in the database beside the outbox table.
//!
//! `outbox_relay_backfill` holds one row per slot: the state, the condition, where the
//! slot started and how far publishing has been confirmed. `outbox_relay_backfill_<slot>`
//! lists the rows to publish, numbered in insertion order, as the slot's exported snapshot
//! saw them. That list is what makes an interrupted backfill resumable: the snapshot dies
//! with the session that exported it, the list does not (docs/adr/0010).

use tokio_postgres::{Client, GenericClient};

use crate::lsn::Lsn;
use crate::postgres::catalog::{quote_identifier, PublishedTable};

/// Where a backfill stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The list is being made; the slot, if any, was made by this backfill and nothing
    /// was published from it.
    Pending,
    /// The list is made: publishing it, or interrupted while publishing.
    Ready,
    /// Every row of the list was published; `run` streams from the slot.
    Finished,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Ready => "ready",
            State::Finished => "finished",
        }
    }

    fn parse(text: &str) -> Option<State> {
        [State::Pending, State::Ready, State::Finished]
            .into_iter()
            .find(|state| state.as_str() == text)
    }
}

/// The state row of one slot's backfill.
#[derive(Debug, Clone)]
pub struct Record {
    pub state: State,
    pub table: String,
    pub condition: String,
    /// Where the slot started (set once the list is made).
    pub start_lsn: Option<Lsn>,
    /// How many rows the list has.
    pub rows: i64,
    /// Every row numbered up to this one is published (confirmed).
    pub done_through: i64,
}

/// The manifest of backfills in the schema of the outbox table.
#[derive(Debug, Clone)]
pub struct Manifest {
    schema: String,
    slot: String,
}

impl Manifest {
    pub fn new(table: &PublishedTable, slot: &str) -> Self {
        Manifest {
            schema: table.schema.clone(),
            slot: slot.to_owned(),
        }
    }

    fn state_table(&self) -> String {
        format!("{}.outbox_relay_backfill", quote_identifier(&self.schema))
    }

    /// The list of rows to publish (slot names are plain identifiers).
    pub fn list_table(&self) -> String {
        format!(
            "{}.{}",
            quote_identifier(&self.schema),
            quote_identifier(&format!("outbox_relay_backfill_{}", self.slot))
        )
    }

    /// The slot's backfill, if there is one (and the state table, if it exists).
    pub async fn read(&self, client: &Client) -> Result<Option<Record>, tokio_postgres::Error> {
        let exists: bool = client
            .query_one(
                "SELECT to_regclass(format('%I.outbox_relay_backfill', $1::text)) IS NOT NULL",
                &[&self.schema],
            )
            .await?
            .get(0);
        if !exists {
            return Ok(None);
        }
        let row = client
            .query_opt(
                &format!(
                    "SELECT state, table_name, where_clause, start_lsn::text, coalesce(rows, 0), done_through
                       FROM {} WHERE slot = $1",
                    self.state_table()
                ),
                &[&self.slot],
            )
            .await?;
        Ok(row.and_then(|row| {
            Some(Record {
                state: State::parse(row.get(0))?,
                table: row.get(1),
                condition: row.get(2),
                start_lsn: row.get::<_, Option<String>>(3).and_then(|t| t.parse().ok()),
                rows: row.get(4),
                done_through: row.get(5),
            })
        }))
    }

    /// Starts a backfill of `table` (forgetting any earlier one of this slot): the state
    /// row says `pending` and the list is empty, with the id column's type.
    pub async fn begin(
        &self,
        client: &mut Client,
        table: &PublishedTable,
        id_column: &str,
        condition: &str,
    ) -> Result<(), tokio_postgres::Error> {
        let transaction = client.transaction().await?;
        transaction
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    slot text PRIMARY KEY,
                    state text NOT NULL,
                    table_name text NOT NULL,
                    where_clause text NOT NULL,
                    start_lsn pg_lsn,
                    rows bigint,
                    done_through bigint NOT NULL DEFAULT 0,
                    started_at timestamptz NOT NULL DEFAULT now(),
                    finished_at timestamptz);
                 SET LOCAL client_min_messages = warning;
                 DROP TABLE IF EXISTS {list};
                 CREATE TABLE {list} AS SELECT 0::bigint AS ordinal, t.{id} AS id FROM {table} t WITH NO DATA;
                 ALTER TABLE {list} ADD PRIMARY KEY (ordinal);",
                self.state_table(),
                list = self.list_table(),
                id = quote_identifier(id_column),
                table = table.qualified(),
            ))
            .await?;
        transaction
            .execute(
                &format!(
                    "INSERT INTO {} (slot, state, table_name, where_clause) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (slot) DO UPDATE SET state = $2, table_name = $3, where_clause = $4,
                        start_lsn = NULL, rows = NULL, done_through = 0, started_at = now(), finished_at = NULL",
                    self.state_table()
                ),
                &[&self.slot, &State::Pending.as_str(), &table.display(), &condition],
            )
            .await?;
        transaction.commit().await
    }

    /// Lists the rows of the exported `snapshot` that match `condition`, numbered from 1
    /// in `order` (then id) order, and marks the backfill `ready`. Returns how many.
    #[allow(clippy::too_many_arguments)]
    pub async fn list(
        &self,
        client: &mut Client,
        snapshot: &str,
        start: Lsn,
        table: &PublishedTable,
        id_column: &str,
        order_column: &str,
        condition: &str,
    ) -> Result<i64, tokio_postgres::Error> {
        let transaction = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await?;
        // The snapshot name comes from the server; quote it as a literal all the same.
        transaction
            .batch_execute(&format!("SET TRANSACTION SNAPSHOT '{}'", snapshot.replace('\'', "''")))
            .await?;
        // The condition is the operator's SQL, run as the configured role, in this one
        // statement (the extended protocol refuses a second statement).
        let listed = transaction
            .execute(
                &format!(
                    "INSERT INTO {list} (ordinal, id)
                     SELECT row_number() OVER (ORDER BY t.{order}, t.{id}), t.{id} FROM {table} t WHERE ({condition})",
                    list = self.list_table(),
                    order = quote_identifier(order_column),
                    id = quote_identifier(id_column),
                    table = table.qualified(),
                ),
                &[],
            )
            .await?;
        let listed = listed as i64;
        self.set(
            &transaction,
            "state = $2, start_lsn = $3::text::pg_lsn, rows = $4",
            &[&State::Ready.as_str(), &start.to_string(), &listed],
        )
        .await?;
        transaction.commit().await?;
        Ok(listed)
    }

    /// Records that every listed row up to `ordinal` is published.
    pub async fn done_through(&self, client: &Client, ordinal: i64) -> Result<(), tokio_postgres::Error> {
        self.set(client, "done_through = greatest(done_through, $2)", &[&ordinal])
            .await
    }

    /// Marks the backfill finished and drops its list.
    pub async fn finish(&self, client: &mut Client, ordinal: i64) -> Result<(), tokio_postgres::Error> {
        let transaction = client.transaction().await?;
        self.set(
            &transaction,
            "state = $2, done_through = greatest(done_through, $3), finished_at = now()",
            &[&State::Finished.as_str(), &ordinal],
        )
        .await?;
        transaction
            .batch_execute(&format!("DROP TABLE IF EXISTS {}", self.list_table()))
            .await?;
        transaction.commit().await
    }

    async fn set<C: GenericClient>(
        &self,
        client: &C,
        assignments: &str,
        values: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<(), tokio_postgres::Error> {
        let mut parameters: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&self.slot];
        parameters.extend_from_slice(values);
        client
            .execute(
                &format!("UPDATE {} SET {assignments} WHERE slot = $1", self.state_table()),
                &parameters,
            )
            .await?;
        Ok(())
    }

    /// Rows of the list after `after`, at most `limit`, as `(ordinal, row)` with the
    /// table's columns as text from column 1 on ([`crate::postgres::catalog`]).
    pub fn batch_query(&self, table: &PublishedTable, id_column: &str) -> String {
        format!(
            "SELECT l.ordinal, {columns} FROM {list} l JOIN {table} t ON t.{id} = l.id
              WHERE l.ordinal > $1 ORDER BY l.ordinal LIMIT $2",
            columns = table.text_select_list(Some("t")),
            list = self.list_table(),
            table = table.qualified(),
            id = quote_identifier(id_column),
        )
    }
}
