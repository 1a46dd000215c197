//! Drain to RabbitMQ: 1M single-row transactions published by outbox-relay (`--sink
//! rabbitmq`: persistent, mandatory, publisher confirms) and by the seeds' own design, a
//! SKIP LOCKED poller publishing with the same client library (lapin) and the same
//! guarantees (persistent, mandatory, every confirm awaited before the batch is deleted), to
//! the same exchange and one durable queue bound to every routing key.

use std::time::Instant;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio_postgres::Client;

use crate::{drain, poller, rig};

/// What one RabbitMQ drain measured.
pub struct Row {
    pub events: u64,
    pub relay_secs: f64,
    pub relay_cpu: f64,
    pub relay_rss: f64,
    pub poller_secs: f64,
    /// The same number of messages from a plain lapin publisher with confirms, no database.
    pub alone_secs: f64,
}

pub const HEADER: &str = "| sink | backlog | events | outbox-relay: all confirmed, s | events/s | relay CPU us/event | relay peak RSS MiB | SKIP LOCKED poller, s | events/s | relay / poller | the broker alone, s | events/s |
| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

impl Row {
    pub fn markdown(&self) -> String {
        let n = self.events as f64;
        format!(
            "| rabbitmq | single-row transactions | {} | {:.2} | {:.0} | {:.1} | {:.1} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} |",
            self.events,
            self.relay_secs,
            n / self.relay_secs,
            self.relay_cpu * 1e6 / n,
            self.relay_rss,
            self.poller_secs,
            n / self.poller_secs,
            self.poller_secs / self.relay_secs,
            self.alone_secs,
            n / self.alone_secs
        )
    }
}

/// Writes the backlog, drains it with the relay, then lets the poller publish and delete
/// the same rows; the queue is emptied in between.
pub async fn drain(events: u64, admin_url: &str, amqp_url: &str) -> Row {
    let run = std::process::id();
    let database = format!("bench_{run}_rabbitmq");
    let url = rig::fresh_database(admin_url, &database).await;
    let mut client = rig::connect(&url).await;
    let slot = format!("bench_rabbitmq_{run}");
    let exchange = format!("bench{run}");
    rig::setup(&url, &slot);
    let status = std::process::Command::new(rig::relay_binary())
        .args([
            "setup",
            "--sink",
            "rabbitmq",
            "--amqp-exchange",
            &exchange,
            "--slot",
            &slot,
        ])
        .env("DATABASE_URL", &url)
        .env("AMQP_URL", amqp_url)
        .env("OUTBOX_RELAY_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("setup --sink rabbitmq");
    assert!(status.success(), "setup --sink rabbitmq failed");
    let connection = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let channel = connection.create_channel().await.expect("channel");
    let queue = format!("bench{run}.all");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue");
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    poller::prepare(&client).await;
    let target = drain::write_backlog(&client, drain::SCENARIOS[0], events).await;

    let sink = [
        ("OUTBOX_RELAY_SINK", "rabbitmq"),
        ("AMQP_URL", amqp_url),
        ("OUTBOX_RELAY_AMQP_EXCHANGE", exchange.as_str()),
    ];
    let relay = drain::relay_drain_to(&url, "", &slot, &format!("bench{run}"), &target, &client, &sink).await;
    println!("rabbitmq: outbox-relay {:.2} s", relay.secs);
    channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .expect("purge");

    client.batch_execute("ANALYZE outbox").await.expect("analyze");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let started = Instant::now();
    let mut polled = 0u64;
    loop {
        let batch = poll_once(&mut client, &channel, &exchange, &format!("bench{run}")).await;
        if batch == 0 {
            break;
        }
        polled += batch as u64;
    }
    let poller_secs = started.elapsed().as_secs_f64();
    assert_eq!(polled, events, "the poller published every row");
    println!("rabbitmq: poller {poller_secs:.2} s");
    channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    let alone_secs = alone(&channel, &exchange, &format!("bench{run}.bench"), events).await;
    println!("rabbitmq: the broker alone {alone_secs:.2} s");
    let _ = channel
        .queue_delete(queue.as_str().into(), lapin::options::QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done".into()).await;
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .expect("drop slot");
    drop(client);
    rig::drop_database(admin_url, &database).await;
    Row {
        events,
        relay_secs: relay.secs,
        relay_cpu: relay.cpu,
        relay_rss: relay.rss,
        poller_secs,
        alone_secs,
    }
}

/// The broker's ceiling: `events` persistent, mandatory messages of the backlog's size from
/// one channel in confirm mode, up to 10,000 unconfirmed, as the relay's window.
async fn alone(channel: &Channel, exchange: &str, routing_key: &str, events: u64) -> f64 {
    let started = Instant::now();
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    for i in 0..events {
        if in_flight.len() >= 10_000 {
            let confirmed = futures_util::StreamExt::next(&mut in_flight).await;
            assert!(confirmed.is_some_and(|c: lapin::Result<lapin::Confirmation>| c.is_ok_and(|c| c.is_ack())));
        }
        let body = format!(r#"{{"i": {i}}}"#);
        let properties = BasicProperties::default()
            .with_message_id(format!("00000000-0000-0000-0000-{i:012}").into())
            .with_delivery_mode(2);
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body.as_bytes(),
                properties,
            )
            .await
            .expect("publish");
        in_flight.push(confirm);
    }
    while let Some(confirmed) = futures_util::StreamExt::next(&mut in_flight).await {
        assert!(confirmed.is_ok_and(|c| c.is_ack()));
    }
    started.elapsed().as_secs_f64()
}

/// One batch: select, publish (persistent, mandatory), await every confirm, delete, commit.
async fn poll_once(client: &mut Client, channel: &Channel, exchange: &str, prefix: &str) -> usize {
    let transaction = client.transaction().await.expect("begin");
    let rows = transaction
        .query(
            "SELECT id::text AS event_id, aggregate_type, aggregate_id, event_type, payload::text
               FROM outbox ORDER BY created_at, id LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&poller::BATCH],
        )
        .await
        .expect("poll");
    if rows.is_empty() {
        return 0;
    }
    let mut confirms = Vec::with_capacity(rows.len());
    let mut ids = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: &str = row.get(0);
        let aggregate_type: &str = row.get(1);
        let key: &str = row.get(2);
        let event_type: &str = row.get(3);
        let payload: &str = row.get(4);
        let mut headers = FieldTable::default();
        headers.insert("aggregate_id".into(), AMQPValue::LongString(LongString::from(key)));
        let properties = BasicProperties::default()
            .with_message_id(id.into())
            .with_type(event_type.into())
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_headers(headers);
        let routing_key = format!("{prefix}.{aggregate_type}");
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload.as_bytes(),
                properties,
            )
            .await
            .expect("publish");
        confirms.push(confirm);
        ids.push(id.to_owned());
    }
    for confirm in futures_util::future::join_all(confirms).await {
        let confirmation = confirm.expect("confirm");
        assert!(
            confirmation.is_ack() && confirmation.take_message().is_none(),
            "routed and confirmed"
        );
    }
    transaction
        .execute("DELETE FROM outbox WHERE id = ANY($1::text[]::uuid[])", &[&ids])
        .await
        .expect("delete");
    transaction.commit().await.expect("commit");
    rows.len()
}
