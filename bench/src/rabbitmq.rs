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
    /// The same number of messages, shaped as the relay's, from a plain lapin publisher
    /// with confirms, no database.
    pub alone_secs: f64,
    /// RabbitMQ's CPU seconds during the relay's, the poller's and the lone drain, when the
    /// node is the bench's own.
    pub broker_cpu: Option<[f64; 3]>,
}

pub const HEADER: &str = "| sink | backlog | events | outbox-relay: all confirmed, s | events/s | relay CPU us/event | relay peak RSS MiB | SKIP LOCKED poller, s | events/s | relay / poller | the broker alone, s | events/s | RabbitMQ CPU us/event: relay / poller / alone |
| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

impl Row {
    pub fn markdown(&self) -> String {
        let n = self.events as f64;
        format!(
            "| rabbitmq | single-row transactions | {} | {:.2} | {:.0} | {:.1} | {:.1} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} | {} |",
            self.events,
            self.relay_secs,
            n / self.relay_secs,
            self.relay_cpu * 1e6 / n,
            self.relay_rss,
            self.poller_secs,
            n / self.poller_secs,
            self.poller_secs / self.relay_secs,
            self.alone_secs,
            n / self.alone_secs,
            self.broker_cpu.map_or_else(
                || "n/a".to_owned(),
                |[relay, poller, alone]| format!(
                    "{:.1} / {:.1} / {:.1}",
                    relay * 1e6 / n,
                    poller * 1e6 / n,
                    alone * 1e6 / n
                )
            )
        )
    }
}

/// Writes the backlog, drains it with the relay, then lets the poller publish and delete
/// the same rows; the queue is emptied in between.
pub async fn drain(events: u64, admin_url: &str, amqp_url: &str, beam: Option<u32>) -> Row {
    let broker_cpu = || beam.map_or(0.0, crate::probe::cpu_seconds);
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
    let cpu_before = broker_cpu();
    let relay = drain::relay_drain_to(&url, "", &slot, &format!("bench{run}"), &target, &client, &sink).await;
    let cpu_relay = broker_cpu() - cpu_before;
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
    let cpu_before = broker_cpu();
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
    let cpu_poller = broker_cpu() - cpu_before;
    assert_eq!(polled, events, "the poller published every row");
    println!("rabbitmq: poller {poller_secs:.2} s");
    channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    let cpu_before = broker_cpu();
    let alone_secs = alone(&channel, &exchange, &format!("bench{run}.bench"), events).await;
    let cpu_alone = broker_cpu() - cpu_before;
    println!("rabbitmq: the broker alone {alone_secs:.2} s");
    let _ = channel
        .queue_delete(queue.as_str().into(), lapin::options::QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done".into()).await;
    drop(client);
    rig::drop_database(admin_url, &database).await;
    Row {
        events,
        relay_secs: relay.secs,
        relay_cpu: relay.cpu,
        relay_rss: relay.rss,
        poller_secs,
        alone_secs,
        broker_cpu: beam.map(|_| [cpu_relay, cpu_poller, cpu_alone]),
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
        let id = format!("00000000-0000-0000-0000-{i:012}");
        let mut headers = FieldTable::default();
        for (name, value) in [
            ("aggregate_id", format!("k{}", i % 1000)),
            ("id", id.clone()),
            ("event_type", "Bench".to_owned()),
            ("aggregate_type", "bench".to_owned()),
            ("outbox.commit_lsn", "0/167CEA90".to_owned()),
            ("outbox.tx_index", "0".to_owned()),
            ("outbox.source", "bench/bench_rabbitmq".to_owned()),
        ] {
            headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
        }
        // Shaped as the relay's messages: same properties, same headers.
        let properties = BasicProperties::default()
            .with_message_id(id.into())
            .with_type("Bench".into())
            .with_content_type("application/json".into())
            .with_app_id("outbox-relay".into())
            .with_timestamp(1_795_000_000)
            .with_delivery_mode(2)
            .with_headers(headers);
        in_flight.push(publish(channel, exchange, routing_key, body.as_bytes(), properties).await);
    }
    while let Some(confirmed) = futures_util::StreamExt::next(&mut in_flight).await {
        assert!(confirmed.is_ok_and(|c| c.is_ack()));
    }
    started.elapsed().as_secs_f64()
}

/// Publishes one message `mandatory` (an unroutable one comes back); the confirm to await.
async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> lapin::PublisherConfirm {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    channel
        .basic_publish(exchange.into(), routing_key.into(), options, body, properties)
        .await
        .expect("publish")
}

/// One batch: select, publish (persistent, mandatory), await every confirm, delete, commit.
async fn poll_once(client: &mut Client, channel: &Channel, exchange: &str, prefix: &str) -> usize {
    let transaction = client.transaction().await.expect("begin");
    let rows = transaction.query(poller::POLL, &[&poller::BATCH]).await.expect("poll");
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
        confirms.push(publish(channel, exchange, &routing_key, payload.as_bytes(), properties).await);
        ids.push(id.to_owned());
    }
    for confirm in futures_util::future::join_all(confirms).await {
        let confirmation = confirm.expect("confirm");
        assert!(
            confirmation.is_ack() && confirmation.take_message().is_none(),
            "routed and confirmed"
        );
    }
    transaction.execute(poller::DELETE, &[&ids]).await.expect("delete");
    transaction.commit().await.expect("commit");
    rows.len()
}
