//! `scripts/debezium-compare`: the same outbox rows through Debezium 3.6's Outbox Event
//! Router (embedded engine, via `scripts/debezium/capture.py`) and through
//! `outbox-relay run --preset debezium`, compared record by record.
//!
//! Compared: topic, key, value, the `id` header and every header Debezium places from an
//! extra column. Not compared, by design (docs/debezium.md): Debezium's
//! `__debezium.context.*` headers and outbox-relay's `event_type`, `aggregate_type` and
//! `outbox.*` headers, which the other side does not write.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/kafka.rs"]
#[allow(dead_code)]
mod kafka;

mod common;

use common::relay_binary;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// The columns Debezium is told to place as headers (`table.fields.additional.placement`):
/// two text columns and one of each type whose rendering differs between PostgreSQL's
/// text form and Debezium's converters.
const PLACED: [&str; 23] = [
    "tenant", "region", "ts_tz", "ts", "d", "t", "t_tz", "flag", "n_int", "n_big", "amount", "ratio", "ref", "raw",
    "doc", "doc_json", "tags", "counts", "ts_tz3", "ts3", "t3", "f4", "f8",
];

/// The typed columns' definitions, in `PLACED` order after the two text columns.
const TYPED_COLUMNS: &str = "ts_tz timestamptz, ts timestamp, d date, t time, t_tz timetz, flag boolean,
    n_int integer, n_big bigint, amount numeric(12,2), ratio numeric, ref uuid, raw bytea, doc jsonb,
    doc_json json, tags text[], counts int[], ts_tz3 timestamptz(3), ts3 timestamp(3), t3 time(3), f4 real,
    f8 double precision";

/// Rows with every typed column set (the other rows leave them NULL): fractions of
/// seconds, zones, dates before 1970, extremes, empty and NULL array elements.
const TYPED_ROWS: [&str; 2] = [
    "('2026-11-29 16:00:00.123456+00', '2026-11-29 16:00:00.123456', '2026-11-29', '16:00:00.123456',
      '16:00:00.5+02', true, -42, 9007199254740993, 1234567890.12, 3.14159265358979323846,
      'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff10', '{\"b\": 1, \"a\": [1, 2.50]}', '{\"b\": 1,  \"a\": 2}',
      ARRAY['a', 'b c', 'q\"uote', NULL], ARRAY[1, 2, 3], '2026-11-29 16:00:00.123456+00',
      '2026-11-29 16:00:00.123456', '16:00:00.123456', 1.5, 1e10)",
    "('1969-07-20 20:17:40+00', '1969-07-20 20:17:40', '1969-07-20', '00:00:00', '23:59:59-05', false, 0, -1,
      0.50, 0.0000000001, '00000000-0000-0000-0000-000000000000', '\\x', 'null', '[]', '{}', '{}',
      '1969-07-20 20:17:40+00', '1969-07-20 20:17:40.5', '00:00:00.001', -0.0001, 0.1)",
];

/// A child process that is stopped when this program ends, even by a panic.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        devrig::kill(self.0.id(), 15);
        let _ = self.0.wait();
    }
}

/// An outbox row to insert: aggregateid, type, payload, tenant, region.
type Row = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
);

/// One record, reduced to what both sides should agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    topic: String,
    key: Option<String>,
    value: Option<String>,
    headers: BTreeMap<String, Option<String>>,
}

fn compared_headers(all: impl IntoIterator<Item = (String, Option<String>)>) -> BTreeMap<String, Option<String>> {
    all.into_iter()
        .filter(|(name, _)| name == "id" || PLACED.contains(&name.as_str()))
        .collect()
}

fn from_debezium(line: &str) -> Seen {
    let json: serde_json::Value = serde_json::from_str(line).expect("capture.py prints JSON");
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    let headers = json["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .map(|pair| (pair[0].as_str().unwrap().to_owned(), text(&pair[1])));
    Seen {
        topic: json["topic"].as_str().unwrap().to_owned(),
        key: text(&json["key"]),
        value: text(&json["value"]),
        headers: compared_headers(headers),
    }
}

fn from_relay(record: &kafka::Record) -> Seen {
    let text = |bytes: &Option<Vec<u8>>| bytes.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
    Seen {
        topic: record.topic.clone(),
        key: text(&record.key),
        value: text(&record.payload),
        headers: compared_headers(record.headers.iter().map(|(name, value)| (name.clone(), text(value)))),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let python = std::env::var("DEBEZIUM_PYTHON").unwrap_or_else(|_| ".tools/dbz/bin/python".into());
    let (admin_url, _postgres) = match std::env::var("DATABASE_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let postgres = devrig::Postgres::start().expect("start PostgreSQL");
            (postgres.url("postgres"), Some(postgres))
        }
    };
    let (bootstrap, _broker) = match std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
        Ok(servers) => (servers, None),
        Err(_) => {
            let broker = devrig::Broker::start().expect("start tansu");
            (broker.bootstrap_servers(), Some(broker))
        }
    };
    let run = std::process::id();
    let database = format!("dbz_compare_{run}");
    let (admin, connection) = tokio_postgres::connect(&admin_url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    admin
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .await
        .expect("create database");
    let config: tokio_postgres::Config = admin_url.parse().expect("DATABASE_URL");
    let mut config_db = config.clone();
    config_db.dbname(&database);
    let (mut client, connection) = config_db.connect(NoTls).await.expect("connect");
    tokio::spawn(connection);
    // Debezium's documented outbox table, with two extra columns placed as headers.
    client
        .batch_execute(&format!(
            "CREATE TABLE outboxevent (
                 id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                 aggregatetype varchar(255) NOT NULL,
                 aggregateid varchar(255) NOT NULL,
                 type varchar(255) NOT NULL,
                 payload jsonb,
                 tenant text,
                 region text,
                 {TYPED_COLUMNS});
             CREATE PUBLICATION compare_pub FOR TABLE outboxevent WITH (publish = 'insert');"
        ))
        .await
        .expect("create the outbox table");
    let url_db = {
        let (base, query) = admin_url
            .split_once('?')
            .map_or((admin_url.as_str(), ""), |(b, q)| (b, q));
        let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!("{base}/{database}{query}")
    };

    let status = Command::new(relay_binary())
        .args(["setup", "--slot", "relay_side", "--publication", "compare_pub"])
        .env("DATABASE_URL", &url_db)
        .stdout(Stdio::null())
        .status()
        .expect("setup");
    assert!(status.success(), "outbox-relay setup failed");
    let _relay = Stopped(
        Command::new(relay_binary())
            .args([
                "run",
                "--slot",
                "relay_side",
                "--publication",
                "compare_pub",
                "--preset",
                "debezium",
            ])
            .args(["--topic-template", "outbox.event.{aggregatetype}"])
            .env("DATABASE_URL", &url_db)
            .env("KAFKA_BOOTSTRAP_SERVERS", &bootstrap)
            .env("OUTBOX_RELAY_METRICS_ADDR", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start outbox-relay"),
    );

    // Rows covering what differs between implementations: NULL extra columns, jsonb
    // normalisation, unicode, numbers, several events in one transaction.
    let aggregate = format!("Cmp{run}");
    let rows: [Row; 5] = [
        (
            "o-1",
            "OrderCreated",
            Some(r#"{"b": 2, "a": 1}"#),
            Some("acme"),
            Some("eu"),
        ),
        (
            "o-2",
            "OrderShipped",
            Some(r#"{"nested": {"k": [1, 2.50, 1e3]}, "s": "é ✓"}"#),
            None,
            Some("us"),
        ),
        (
            "ö-3",
            "OrderPaid",
            Some(r#"{"big": 12345678901234567890}"#),
            Some("t\"q"),
            None,
        ),
        ("o-4", "OrderClosed", Some("null"), None, None),
        ("o-5", "OrderDeleted", None, None, None),
    ];
    let count = rows.len() + 2 + TYPED_ROWS.len();
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432).to_string();
    let placement = PLACED.map(|c| format!("{c}:header")).join(",");
    let mut debezium = Stopped(
        Command::new(&python)
            .arg("scripts/debezium/capture.py")
            .args([
                &host,
                &port,
                &database,
                &user,
                &password,
                "debezium_side",
                "compare_pub",
            ])
            .args([&count.to_string(), &placement])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}; run scripts/debezium-compare")),
    );
    let stdout = debezium.0.stdout.take().expect("stdout");
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(record) = line.strip_prefix("RECORD ") {
                let _ = sender.send(record.to_owned());
            }
        }
    });

    // Debezium creates its slot when it starts; wait until both sides stream.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let active: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE active AND slot_name IN ('relay_side', 'debezium_side')",
                &[],
            )
            .await
            .expect("slots")
            .get(0);
        if active == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Debezium did not start streaming within 3 minutes"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    for (aggregate_id, event_type, payload, tenant, region) in &rows {
        client
            .execute(
                "INSERT INTO outboxevent (aggregatetype, aggregateid, type, payload, tenant, region)
                 VALUES ($1, $2, $3, $4::text::jsonb, $5, $6)",
                &[&aggregate, aggregate_id, event_type, payload, tenant, region],
            )
            .await
            .expect("insert");
    }
    let transaction = client.transaction().await.expect("begin");
    for n in 6..8 {
        transaction
            .execute(
                "INSERT INTO outboxevent (aggregatetype, aggregateid, type, payload) VALUES ($1, 'o-6', 'Batch', $2::text::jsonb)",
                &[&aggregate, &format!("{{\"n\": {n}}}")],
            )
            .await
            .expect("insert");
    }
    transaction.commit().await.expect("commit");
    let typed_columns: Vec<&str> = PLACED[2..].to_vec();
    for (n, values) in TYPED_ROWS.iter().enumerate() {
        let values = values.trim_start_matches('(');
        client
            .execute(
                &format!(
                    "INSERT INTO outboxevent (aggregatetype, aggregateid, type, payload, {})
                     VALUES ($1, 'typed-{n}', 'Typed', '{{}}', {values}",
                    typed_columns.join(", ")
                ),
                &[&aggregate],
            )
            .await
            .expect("insert a typed row");
    }

    let mut from_dbz = Vec::new();
    while from_dbz.len() < count {
        let line = lines
            .recv_timeout(Duration::from_secs(120))
            .expect("Debezium routed every row within 2 minutes");
        from_dbz.push(from_debezium(&line));
    }
    let topic = format!("outbox.event.{aggregate}");
    let mut consumer = kafka::Consumer::new(&bootstrap, std::slice::from_ref(&topic));
    consumer.read_until(Duration::from_secs(60), "outbox-relay's records", |records| {
        records.len() >= count
    });
    let ours: BTreeMap<String, Seen> = consumer
        .records
        .iter()
        .map(|r| (r.header("id").unwrap_or_default(), from_relay(r)))
        .collect();

    let mut differences = 0;
    println!("debezium-compare: {count} rows, Debezium 3.6 EventRouter vs outbox-relay --preset debezium");
    for theirs in &from_dbz {
        let id = theirs.headers.get("id").cloned().flatten().unwrap_or_default();
        let Some(mine) = ours.get(&id) else {
            println!("  {id}: missing from outbox-relay's topic");
            differences += 1;
            continue;
        };
        if mine == theirs {
            println!(
                "  {id}: same (topic, key {:?}, value, headers {:?})",
                mine.key, mine.headers
            );
        } else {
            differences += 1;
            println!("  {id}: DIFFERENT\n    debezium:     {theirs:?}\n    outbox-relay: {mine:?}");
        }
    }
    drop(debezium);
    drop(_relay);
    admin
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{database}' AND NOT active"
        ))
        .await
        .ok();
    if differences > 0 {
        println!("debezium-compare: {differences} record(s) differ");
        std::process::exit(1);
    }
    println!("debezium-compare: every record matches");
}
