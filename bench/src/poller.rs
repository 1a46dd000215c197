//! The polling design of our seed documents, done well, as the baseline: one poller that
//! takes a batch of rows with `SELECT ... ORDER BY created_at LIMIT n FOR UPDATE SKIP
//! LOCKED`, publishes them with the relay's producer settings (idempotent, acks=all),
//! waits for every acknowledgement, deletes the batch and commits. An index on
//! `(created_at, id)` keeps each poll cheap.

use std::time::Instant;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_postgres::Client;

/// Rows per poll: the batch of the reference poller measured in issue 6.
pub const BATCH: i64 = 500;

/// One poll: the oldest unlocked batch, locked until the transaction ends.
pub const POLL: &str = "SELECT id::text AS event_id, aggregate_type, aggregate_id, event_type, payload::text
   FROM outbox ORDER BY created_at, id LIMIT $1 FOR UPDATE SKIP LOCKED";

/// Deletes the published batch.
pub const DELETE: &str = "DELETE FROM outbox WHERE id = ANY($1::text[]::uuid[])";

/// Creates the index a polling relay needs; run before the backlog is written.
pub async fn prepare(client: &Client) {
    client
        .batch_execute("CREATE INDEX IF NOT EXISTS outbox_poll ON outbox (created_at, id)")
        .await
        .expect("poller index");
}

/// The relay's producer settings.
pub fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("queue.buffering.max.kbytes", "65536")
        .set("client.id", "outbox-poller")
        .create()
        .expect("producer")
}

/// Publishes and deletes every row of the outbox; returns the events and the seconds.
pub async fn drain(client: &mut Client, bootstrap: &str, topic_prefix: &str) -> (u64, f64) {
    // Fresh statistics, as autovacuum keeps them on a live table: without them the planner
    // may sort the whole backlog for every batch instead of walking the index.
    client.batch_execute("ANALYZE outbox").await.expect("analyze");
    let producer = producer(bootstrap);
    let started = Instant::now();
    let mut published = 0u64;
    loop {
        let batch = poll_once(client, &producer, topic_prefix).await;
        if batch == 0 {
            break;
        }
        published += batch as u64;
    }
    (published, started.elapsed().as_secs_f64())
}

/// Polls continuously until `stop`: again at once after a full batch, after
/// [`POLL_INTERVAL`] when the table is empty.
pub async fn run(
    mut client: Client,
    bootstrap: String,
    topic_prefix: String,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let producer = producer(&bootstrap);
    while !*stop.borrow() {
        if poll_once(&mut client, &producer, &topic_prefix).await < BATCH as usize {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// How long an idle poller waits between polls.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// One batch: select, publish, wait for the acknowledgements, delete, commit.
async fn poll_once(client: &mut Client, producer: &FutureProducer, topic_prefix: &str) -> usize {
    let transaction = client.transaction().await.expect("begin");
    let rows = transaction.query(POLL, &[&BATCH]).await.expect("poll");
    if rows.is_empty() {
        return 0;
    }
    let mut deliveries = Vec::with_capacity(rows.len());
    let mut ids = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: &str = row.get(0);
        let aggregate_type: &str = row.get(1);
        let key: &str = row.get(2);
        let event_type: &str = row.get(3);
        let payload: &str = row.get(4);
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header {
                key: "id",
                value: Some(id),
            })
            .insert(Header {
                key: "event_type",
                value: Some(event_type),
            });
        let topic = format!("{topic_prefix}.{aggregate_type}");
        let record = FutureRecord::to(&topic).key(key).payload(payload).headers(headers);
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e).expect("queued"));
        ids.push(id.to_owned());
    }
    for outcome in futures_util::future::join_all(deliveries).await {
        outcome
            .expect("delivery report")
            .map_err(|(e, _)| e)
            .expect("acknowledged");
    }
    transaction.execute(DELETE, &[&ids]).await.expect("delete");
    transaction.commit().await.expect("commit");
    rows.len()
}
