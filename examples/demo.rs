//! The local end-to-end demo behind `scripts/demo`: a private PostgreSQL and a tansu
//! broker (or the ones named by `DATABASE_URL` / `KAFKA_BOOTSTRAP_SERVERS`), then
//! `outbox-relay setup` and `outbox-relay run`, a few application transactions, and the
//! events as a Kafka consumer reads them.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/kafka.rs"]
#[allow(dead_code)]
mod kafka;

mod common;

use common::relay_binary;

use std::process::{Command, Stdio};
use std::time::Duration;

use tokio_postgres::NoTls;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (database_url, _postgres) = match std::env::var("DATABASE_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            println!("demo: starting a private PostgreSQL (wal_level=logical)...");
            let postgres = devrig::Postgres::start().expect("start PostgreSQL");
            (postgres.url("postgres"), Some(postgres))
        }
    };
    let (bootstrap, _broker) = match std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
        Ok(servers) => (servers, None),
        Err(_) => {
            println!("demo: starting a local tansu broker...");
            let broker = devrig::Broker::start().expect("start tansu");
            (broker.bootstrap_servers(), Some(broker))
        }
    };
    println!("demo: DATABASE_URL={database_url}\ndemo: KAFKA_BOOTSTRAP_SERVERS={bootstrap}\n");

    println!("$ outbox-relay setup --apply-sql");
    let status = Command::new(relay_binary())
        .args(["setup", "--apply-sql"])
        .env("DATABASE_URL", &database_url)
        .status()
        .expect("run setup");
    assert!(status.success(), "setup failed");

    println!("\n$ outbox-relay run   (its log follows on stderr)");
    let mut relay = Command::new(relay_binary())
        .arg("run")
        .env("DATABASE_URL", &database_url)
        .env("KAFKA_BOOTSTRAP_SERVERS", &bootstrap)
        .env("OUTBOX_RELAY_METRICS_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .spawn()
        .expect("start the relay");

    let (mut client, connection) = tokio_postgres::connect(&database_url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY, customer text NOT NULL, total numeric NOT NULL)",
        )
        .await
        .expect("create orders");
    let run = std::process::id();
    let mut expected = 0;
    for (n, (customer, total)) in [("alice", 42.5), ("bob", 17.0), ("carol", 99.9)].iter().enumerate() {
        let order = format!("order-{run}-{n}");
        let transaction = client.transaction().await.expect("begin");
        transaction
            .execute(
                "INSERT INTO orders (id, customer, total) VALUES ($1, $2, $3::float8::numeric)",
                &[&order, customer, total],
            )
            .await
            .expect("insert order");
        for event in ["OrderPlaced", "OrderPaid"] {
            let payload = format!(r#"{{"orderId": "{order}", "customer": "{customer}", "total": {total}}}"#);
            transaction
                .execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                     VALUES ('order', $1, $2, $3::text::jsonb)",
                    &[&order, &event, &payload],
                )
                .await
                .expect("insert event");
            expected += 1;
        }
        transaction.commit().await.expect("commit");
    }
    // A rolled-back transaction: its event must never appear.
    let transaction = client.transaction().await.expect("begin");
    transaction
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('order', 'never', 'OrderCancelled', '{}')",
            &[],
        )
        .await
        .expect("insert event");
    transaction.rollback().await.expect("rollback");
    println!("demo: committed 3 orders with {expected} events, and rolled back 1 event\n");

    let mut consumer = kafka::Consumer::new(&bootstrap, &["outbox.event.order".to_owned()]);
    let prefix = format!("order-{run}-");
    consumer.read_until(Duration::from_secs(60), "the demo's events", |records| {
        records.iter().filter(|r| r.key_text().starts_with(&prefix)).count() >= expected
    });
    println!("\ndemo: consumed from Kafka:");
    for record in consumer.records.iter().filter(|r| r.key_text().starts_with(&prefix)) {
        println!(
            "  {} [partition {} offset {}] key={} event_type={} payload={}",
            record.topic,
            record.partition,
            record.offset,
            record.key_text(),
            record.header("event_type").unwrap_or_default(),
            String::from_utf8_lossy(record.payload.as_deref().unwrap_or_default()),
        );
    }
    assert!(
        !consumer.records.iter().any(|r| r.key_text() == "never"),
        "a rolled-back event was published"
    );

    devrig::kill(relay.id(), 15);
    let status = relay.wait().expect("wait for the relay");
    println!("\ndemo: relay stopped on SIGTERM ({status}); the rolled-back event never appeared. Done.");
}
