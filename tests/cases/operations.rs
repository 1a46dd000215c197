//! Issue 5, operations: what an operator sees.

use std::time::Duration;

use crate::support::relay::{command, metric};
use crate::support::{eventually, TestDb};

/// Runs `outbox-relay status --json` with extra arguments; returns the JSON and exit code.
fn status(db: &TestDb, extra: &[&str]) -> (serde_json::Value, i32) {
    let output = command()
        .args(["status", "--json"])
        .args(extra)
        .env("DATABASE_URL", &db.url)
        .env("OUTBOX_RELAY_SLOT", &db.slot)
        .output()
        .unwrap();
    let json = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "status printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (json, output.status.code().unwrap_or(-1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_lag_growing_while_the_relay_is_stopped_and_catching_up_after() {
    let db = TestDb::new("status").await;
    let mut relay = db.relay();
    db.insert_event("order", "k", "{}").await;
    db.wait_all_confirmed().await;
    assert_eq!(relay.terminate(Duration::from_secs(10)).code(), Some(0));

    for i in 0..50 {
        db.insert_event("order", &format!("k{i}"), "{}").await;
    }
    let wal_before = db.current_wal_lsn().await;
    let (first, code) = status(&db, &[]);
    let wal_after = db.current_wal_lsn().await;
    let confirmed = db.confirmed_flush_lsn().await;
    let lag = first["lag_bytes"].as_u64().unwrap();
    assert!(
        confirmed.0 + lag >= wal_before.0 && confirmed.0 + lag <= wal_after.0,
        "lag {lag} does not match the slot ({confirmed}) and the server ({wal_before}..{wal_after})"
    );
    assert_eq!(first["active"], false);
    assert_eq!(code, 0, "50 small events are within the default limits: {first}");
    let first_age = first["lag_seconds"].as_f64().unwrap();
    assert!(first_age > 0.0, "{first}");

    // Lag in time grows while nobody confirms; with a 1 s limit the verdict turns.
    let (later, code) = eventually(Duration::from_secs(10), "lag to pass one second", || async {
        let (json, code) = status(&db, &["--max-lag", "1s"]);
        (json["lag_seconds"].as_f64().unwrap_or(0.0) > 1.0).then_some((json, code))
    })
    .await;
    assert!(later["lag_seconds"].as_f64().unwrap() > first_age);
    assert_eq!(later["verdict"], "lagging");
    assert_eq!(code, 1);

    let _relay = db.relay();
    db.wait_all_confirmed().await;
    let (caught_up, code) = status(&db, &["--max-lag", "5s"]);
    assert_eq!(caught_up["verdict"], "healthy", "{caught_up}");
    assert_eq!(code, 0);
    assert!(caught_up["lag_seconds"].as_f64().unwrap_or(0.0) < 5.0, "{caught_up}");
    assert_eq!(caught_up["publication_tables"][0], "public.outbox");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_without_a_slot_says_so() {
    let db = TestDb::new("statusnoslot").await;
    let output = command()
        .args(["status", "--slot", "no_such_slot"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no_such_slot"));
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_outbox_keeps_up_with_writes_in_another_database() {
    let idle = TestDb::new("idlehb").await;
    let busy = TestDb::new("busyhb").await;
    let relay = idle.relay_with(&["--heartbeat-interval", "1s"]);
    idle.insert_event("order", "k", "{}").await;
    idle.wait_all_confirmed().await;
    busy.client
        .batch_execute("CREATE TABLE churn (n int); INSERT INTO churn SELECT generate_series(1, 50000);")
        .await
        .unwrap();
    let target = busy.current_wal_lsn().await;
    idle.wait_confirmed(target, Duration::from_secs(30)).await;
    eventually(Duration::from_secs(15), "a heartbeat to come back", || async {
        relay.log_text().contains("round_trip_ms").then_some(())
    })
    .await;
    idle.drop().await;
    busy.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_least_privilege_role_can_run_the_relay() {
    let mut db = TestDb::new("leastpriv").await;
    let role_sql = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/003_relay_role.sql")).unwrap();
    // The role is cluster-wide and other tests may apply it at the same time.
    let _ = db.client.batch_execute(&role_sql).await;
    db.client.batch_execute(&role_sql).await.unwrap();
    db.client
        .batch_execute("ALTER ROLE outbox_relay PASSWORD 'relay-pw'")
        .await
        .unwrap();
    let superuser_url = db.url.clone();
    let rest = superuser_url.split_once('@').unwrap().1;
    db.url = format!("postgres://outbox_relay:relay-pw@{rest}");
    // With retention, so the role's DELETE grant is exercised too.
    let relay = db.relay_with(&["--retention", "0s", "--heartbeat-interval", "1s"]);
    let id = db.insert_event("order", "k", "{}").await;
    let mut consumer = crate::support::kafka::Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "the event", |records| {
        records.iter().any(|r| r.id() == id)
    });
    db.wait_all_confirmed().await;
    eventually(
        Duration::from_secs(30),
        "the published row to be cleaned up",
        || async { (relay.metric("outbox_relay_rows_cleaned_total") == 1.0).then_some(()) },
    )
    .await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_events_and_show_lag_near_zero_when_caught_up() {
    let db = TestDb::new("metrics").await;
    let relay = db.relay();
    for i in 0..20 {
        db.insert_event("order", &format!("k{i}"), r#"{"n": 1}"#).await;
    }
    db.wait_all_confirmed().await;
    let confirmed = db.confirmed_flush_lsn().await;
    let text = eventually(
        Duration::from_secs(30),
        "metrics of 20 events and a lag sample",
        || async {
            let (status, text) = relay.get("/metrics");
            let published = metric(&text, "outbox_relay_events_published_total").unwrap_or(0.0);
            let lag = metric(&text, "outbox_relay_lag_bytes").unwrap_or(f64::MAX);
            (status == 200 && published >= 20.0 && lag < 1_000_000.0).then_some(text)
        },
    )
    .await;
    assert_eq!(metric(&text, "outbox_relay_events_published_total"), Some(20.0));
    assert_eq!(metric(&text, "outbox_relay_bytes_published_total"), Some(20.0 * 8.0));
    assert!(metric(&text, "outbox_relay_confirmed_lsn").unwrap() >= confirmed.0 as f64 - 1_000_000.0);
    assert!(metric(&text, "outbox_relay_server_wal_lsn").unwrap() > 0.0);
    assert_eq!(metric(&text, "outbox_relay_streaming"), Some(1.0));
    assert!(text.contains("outbox_relay_commit_to_ack_seconds_bucket"), "{text}");
    assert!(
        text.contains("outbox_relay_slot_wal_status{status=\"reserved\"} 1"),
        "{text}"
    );
    assert_eq!(relay.get("/healthz").0, 200);

    // The alert rules and the dashboard only use metrics the relay exports.
    for file in ["deploy/prometheus-alerts.yml", "deploy/grafana-dashboard.json"] {
        let content = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        for name in content
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("outbox_relay_"))
        {
            // A labelled family with no series yet shows only its `# TYPE` line, by base name.
            let base = ["_total", "_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {base} ")),
                "{file} uses {name}, which /metrics does not export"
            );
        }
    }
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_not_ready_while_the_broker_is_down_and_ready_after() {
    let broker = devrig::Broker::start().unwrap();
    let db = TestDb::new("readyz").await;
    let relay = crate::support::Relay::start_with_servers(&db, &broker.bootstrap_servers(), &[]);
    let id = db.insert_event("order", "k", "{}").await;
    let mut consumer = crate::support::kafka::Consumer::new(&broker.bootstrap_servers(), &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "the event", |records| {
        records.iter().any(|r| r.id() == id)
    });
    eventually(Duration::from_secs(30), "ready", || async {
        (relay.get("/readyz").0 == 200).then_some(())
    })
    .await;

    broker.pause();
    let (_, reason) = eventually(Duration::from_secs(30), "not ready during the outage", || async {
        let (status, body) = relay.get("/readyz");
        (status == 503).then_some((status, body))
    })
    .await;
    assert!(reason.contains("broker does not answer"), "{reason}");
    assert_eq!(relay.get("/healthz").0, 200, "alive all the same");

    broker.resume();
    eventually(Duration::from_secs(60), "ready again", || async {
        (relay.get("/readyz").0 == 200).then_some(())
    })
    .await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_message_events_arrive_shaped_like_table_events() {
    let db = TestDb::new("tableless").await;
    let _relay = db.relay();
    let row_id = db
        .client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
             VALUES ('order', 'o-1', 'Placed', '{\"total\": 5}', '{\"tenant\": \"t1\"}') RETURNING id::text",
            &[],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    db.client
        .batch_execute(
            r#"BEGIN;
               SELECT pg_logical_emit_message(true, 'outbox',
                 '{"id": "m-1", "aggregate_type": "order", "aggregate_id": "o-1", "event_type": "Placed",
                   "payload": {"total": 5}, "headers": {"tenant": "t1"}}');
               COMMIT;
               BEGIN;
               SELECT pg_logical_emit_message(true, 'outbox',
                 '{"id": "m-rolled-back", "aggregate_type": "order", "aggregate_id": "o-1", "event_type": "Placed", "payload": {}}');
               ROLLBACK;
               SELECT pg_logical_emit_message(true, 'someone-else', 'not ours');"#,
        )
        .await
        .unwrap();
    let marker = db.insert_event("order", "o-2", "{}").await;
    let mut consumer = crate::support::kafka::Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    let expected: std::collections::HashSet<String> = [row_id.clone(), "m-1".to_owned(), marker].into();
    consumer.read_until(Duration::from_secs(60), "row, message and marker", |records| {
        records.iter().filter(|r| expected.contains(&r.id())).count() == 3
    });
    consumer.read_until_quiet(Duration::from_secs(1));
    let ids: std::collections::HashSet<String> = consumer.records.iter().map(|r| r.id()).collect();
    assert_eq!(ids, expected, "rolled-back and foreign messages are not published");
    assert_eq!(consumer.records.len(), 3);
    let row = consumer.records.iter().find(|r| r.id() == row_id).unwrap();
    let message = consumer.records.iter().find(|r| r.id() == "m-1").unwrap();
    assert_eq!(
        (row.topic.as_str(), row.key_text()),
        (message.topic.as_str(), message.key_text())
    );
    assert_eq!(row.payload, message.payload, "same value bytes");
    for header in ["event_type", "aggregate_type", "tenant"] {
        assert_eq!(row.header(header), message.header(header), "header {header}");
    }
    db.wait_all_confirmed().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debezium_preset_publishes_a_debezium_outbox_table_like_debezium() {
    let mut db = TestDb::new("debezium").await;
    db.client
        .batch_execute(
            "CREATE TABLE outboxevent (
                 id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                 aggregatetype varchar(255) NOT NULL,
                 aggregateid varchar(255) NOT NULL,
                 type varchar(255) NOT NULL,
                 payload jsonb,
                 tenant text,
                 traceparent text);
             CREATE PUBLICATION dbz_pub FOR TABLE outboxevent WITH (publish = 'insert');",
        )
        .await
        .unwrap();
    db.publication = "dbz_pub".into();
    let _relay = db.relay_with(&[
        "--preset",
        "debezium",
        "--topic-template",
        "outbox.event.{aggregatetype}",
    ]);
    // Debezium routes by aggregatetype to outbox.event.<aggregatetype>; a per-test value
    // keeps this test's topic its own.
    let aggregate_type = db.name.clone();
    let id: String = db
        .client
        .query_one(
            "INSERT INTO outboxevent (aggregatetype, aggregateid, type, payload, tenant, traceparent)
             VALUES ($1, 'order-9', 'OrderCreated', '{\"total\": 9}', 'acme',
                     '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01')
             RETURNING id::text",
            &[&aggregate_type],
        )
        .await
        .unwrap()
        .get(0);
    db.client
        .execute(
            "INSERT INTO outboxevent (aggregatetype, aggregateid, type) VALUES ($1, 'order-10', 'OrderDeleted')",
            &[&aggregate_type],
        )
        .await
        .unwrap();
    let topic = format!("outbox.event.{aggregate_type}");
    let mut consumer = crate::support::kafka::Consumer::new(&db.bootstrap_servers, std::slice::from_ref(&topic));
    consumer.read_until(Duration::from_secs(60), "the Debezium-shaped events", |records| {
        records.len() == 2
    });
    let by_key = |key: &str| consumer.records.iter().find(|r| r.key_text() == key).unwrap();
    // As Debezium 3.6's EventRouter does (checked against it, docs/debezium.md): a NULL
    // payload is a tombstone, a NULL extra column a header with a null value.
    let nulls = by_key("order-10");
    assert_eq!(nulls.payload, None, "a NULL payload is a tombstone");
    assert!(
        nulls.headers.contains(&("tenant".to_owned(), None)),
        "{:?}",
        nulls.headers
    );
    assert!(nulls.headers.iter().all(|(name, _)| name != "traceparent"));
    let record = by_key("order-9");
    assert_eq!(record.topic, topic);
    assert_eq!(record.key_text(), "order-9");
    assert_eq!(record.payload.as_deref(), Some(&b"{\"total\": 9}"[..]));
    assert_eq!(record.header("id"), Some(id));
    assert_eq!(
        record.header("tenant").as_deref(),
        Some("acme"),
        "extra columns become headers"
    );
    assert_eq!(
        record.header("traceparent").as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    db.drop().await;
}
