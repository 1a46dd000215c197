//! Issue 4's guarantees under faults: exactly-once through crashes, poison events,
//! PostgreSQL restarts, an invalidated slot, hot standby, and shutdown under load.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::cases::delivery::assert_commit_order_per_key;
use crate::support::kafka::Consumer;
use crate::support::{connect, eventually, Record, TestDb};

/// Writes events in transactions of mixed sizes (1 to 20 rows, now and then 300), rolling
/// back about one in ten; returns the ids of the committed events.
pub async fn write_mixed(url: String, writer: u64, events: usize) -> Vec<String> {
    let mut client = connect(&url).await;
    let mut state = 0x2545_F491_4F6C_DD1Du64 ^ writer;
    let mut next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mut committed = Vec::new();
    while committed.len() < events {
        let size = if next(40) == 0 { 300 } else { 1 + next(20) as usize }.min(events - committed.len());
        let rollback = next(10) == 0;
        let transaction = client.transaction().await.unwrap();
        let rows = transaction
            .query(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                 SELECT 'order', 'w' || $1::int || '-' || (i % 7), 'Tested', jsonb_build_object('i', i)
                   FROM generate_series(1, $2::int) AS i
                 RETURNING id::text",
                &[&(writer as i32), &(size as i32)],
            )
            .await
            .unwrap();
        let ids = rows.iter().map(|row| row.get::<_, String>(0));
        if rollback {
            transaction.rollback().await.unwrap();
        } else {
            transaction.commit().await.unwrap();
            committed.extend(ids);
        }
    }
    committed
}

/// Asserts that the records are exactly `ids`: none missing, none twice, in commit order.
fn assert_exactly_once(records: &[Record], ids: &HashSet<String>) {
    let received: Vec<String> = records.iter().map(Record::id).collect();
    let unique: HashSet<&String> = received.iter().collect();
    let missing = ids.iter().filter(|id| !unique.contains(id)).count();
    let duplicates = received.len() - unique.len();
    eprintln!(
        "exactly-once: {} committed, {} received, {missing} missing, {duplicates} duplicates",
        ids.len(),
        received.len()
    );
    assert_eq!(missing, 0, "events were lost");
    assert_eq!(duplicates, 0, "events were published twice");
    assert_eq!(unique.len(), ids.len(), "unexpected events");
    assert_commit_order_per_key(records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_loop_of_twenty_sigkills_loses_and_duplicates_nothing() {
    let db = TestDb::new("crashloop").await;
    let writers: Vec<_> = (0..4)
        .map(|w| tokio::spawn(write_mixed(db.url.clone(), w, 25_000)))
        .collect();
    let mut writers = writers;
    let mut relay = db.relay();
    let mut state = 0x9E37_79B9u64;
    let mut kills = 0;
    while kills < 20 || writers.iter().any(|w| !w.is_finished()) {
        // Every kill lands mid-stream: keep writing until the twentieth.
        if writers.iter().all(|w| w.is_finished()) {
            writers.push(tokio::spawn(write_mixed(db.url.clone(), 4 + kills, 2_000)));
        }
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        // Let the relay run 50-550 ms, then wait until it has events in flight (handed
        // to Kafka, not yet acknowledged) and kill it at once.
        tokio::time::sleep(Duration::from_millis(50 + (state >> 33) % 500)).await;
        let in_flight = eventually(Duration::from_secs(60), "events in flight before a kill", || async {
            let in_flight = relay.metric("outbox_relay_events_in_flight");
            (in_flight > 0.0).then_some(in_flight)
        })
        .await;
        relay.kill_hard();
        assert!(in_flight > 0.0);
        kills += 1;
        relay = db.relay();
    }
    let mut ids = HashSet::new();
    for writer in writers {
        ids.extend(writer.await.unwrap());
    }
    assert!(ids.len() >= 100_000);
    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(240), "every committed event", |records| {
        records.len() >= ids.len()
    });
    consumer.read_until_quiet(Duration::from_secs(2));
    eprintln!("crash loop: {kills} SIGKILLs, each with events in flight");
    assert_exactly_once(&consumer.records, &ids);
    drop(relay);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_exits_zero_quickly_and_restarts_exactly_once() {
    let db = TestDb::new("termload").await;
    let writer = tokio::spawn(write_mixed(db.url.clone(), 0, 20_000));
    let mut relay = db.relay();
    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "events flowing", |records| {
        records.len() >= 2_000
    });
    let asked = Instant::now();
    let status = relay.terminate(Duration::from_secs(10));
    eprintln!(
        "sigterm under load: exit {:?} after {:?}",
        status.code(),
        asked.elapsed()
    );
    assert_eq!(status.code(), Some(0), "log:\n{}", relay.log_text());

    let _restarted = db.relay();
    let ids: HashSet<String> = writer.await.unwrap().into_iter().collect();
    consumer.read_until(Duration::from_secs(120), "every committed event", |records| {
        records.len() >= ids.len()
    });
    consumer.read_until_quiet(Duration::from_secs(1));
    assert_exactly_once(&consumer.records, &ids);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_relay_takes_over_when_the_active_one_dies() {
    let db = TestDb::new("standby").await;
    let mut active = db.relay();
    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    let first = db.insert_event("order", "k", "{}").await;
    consumer.read_until(Duration::from_secs(60), "the first event", |records| {
        !records.is_empty()
    });
    let standby = db.relay();
    let writer = tokio::spawn(write_mixed(db.url.clone(), 1, 5_000));
    crate::support::eventually(Duration::from_secs(30), "the standby to wait for the slot", || async {
        standby.log_text().contains("waiting for slot").then_some(())
    })
    .await;
    // Both are ready for an orchestrator: one streaming, one a hot standby.
    let (code, body) = crate::support::eventually(Duration::from_secs(30), "the standby to be ready", || async {
        let answer = standby.get("/readyz");
        (answer.0 == 200).then_some(answer)
    })
    .await;
    assert!(code == 200 && body.contains("hot standby"), "{body}");
    assert_eq!(standby.metric("outbox_relay_streaming"), 0.0);
    consumer.read_until(Duration::from_secs(60), "events flowing", |records| {
        records.len() >= 500
    });
    active.kill_hard();
    let mut ids: HashSet<String> = writer.await.unwrap().into_iter().collect();
    ids.insert(first);
    consumer.read_until(Duration::from_secs(120), "every event after the takeover", |records| {
        records.len() >= ids.len()
    });
    consumer.read_until_quiet(Duration::from_secs(1));
    assert!(
        standby.log_text().contains("took over the slot"),
        "{}",
        standby.log_text()
    );
    assert_exactly_once(&consumer.records, &ids);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_busy_exit_ends_with_code_five() {
    let db = TestDb::new("busyexit").await;
    let _active = db.relay();
    crate::support::eventually(Duration::from_secs(30), "the slot to be held", || async {
        let row = db
            .client
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.slot],
            )
            .await
            .ok()?;
        row.get::<_, bool>(0).then_some(())
    })
    .await;
    let mut second = db.relay_with(&["--slot-busy", "exit"]);
    let status = second.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(5), "{}", second.log_text());
    assert!(second.log_text().contains("held by another process"));
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_stream_is_resumed() {
    let mut postgres = devrig::Postgres::start().unwrap();
    let services = crate::support::services();
    let db = TestDb::on(&postgres, &services.bootstrap_servers, "pgrestart").await;
    let relay = db.relay();
    let mut ids = HashSet::new();
    for i in 0..100 {
        ids.insert(db.insert_event("order", &format!("k{}", i % 5), "{}").await);
    }
    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "events before the restart", |r| r.len() >= 100);
    postgres.restart().unwrap();
    let client = connect(&db.url).await;
    for i in 0..100 {
        ids.insert(crate::support::insert_event(&client, "order", &format!("k{}", i % 5), "{}").await);
    }
    consumer.read_until(Duration::from_secs(90), "every event after the restart", |records| {
        records.len() >= ids.len()
    });
    consumer.read_until_quiet(Duration::from_secs(1));
    assert_exactly_once(&consumer.records, &ids);
    assert!(relay.log_text().contains("resuming"), "{}", relay.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_reported_as_possible_loss() {
    let postgres = devrig::Postgres::start_with(&["max_slot_wal_keep_size = 1MB", "wal_keep_size = 0"]).unwrap();
    let services = crate::support::services();
    let db = TestDb::on(&postgres, &services.bootstrap_servers, "lostslot").await;
    // Nobody reads the slot while more WAL than it may keep is written and recycled.
    for _ in 0..3 {
        db.client
            .batch_execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                 SELECT 'order', 'k', 'Tested', jsonb_build_object('pad', repeat('x', 1000)) FROM generate_series(1, 3000);
                 SELECT pg_switch_wal();",
            )
            .await
            .unwrap();
    }
    db.client.batch_execute("CHECKPOINT").await.unwrap();
    let status: Option<String> = db
        .client
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status.as_deref(), Some("lost"));
    let mut relay = db.relay();
    let exit = relay.wait_exit(Duration::from_secs(30));
    let log = relay.log_text();
    assert_eq!(exit.code(), Some(3), "{log}");
    assert!(
        log.contains("invalidated") && log.contains("events may have been lost"),
        "{log}"
    );
}

/// Drops the NOT NULL on aggregate_id, so that a NULL key can reach the relay.
async fn allow_null_keys(db: &TestDb) {
    db.client
        .batch_execute("ALTER TABLE outbox ALTER COLUMN aggregate_id DROP NOT NULL")
        .await
        .unwrap();
}

async fn insert_raw(db: &TestDb, aggregate_type: &str, aggregate_id: Option<&str>, payload: &str) -> String {
    db.client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ($1, $2, 'Tested', $3::text::jsonb) RETURNING id::text",
            &[&aggregate_type, &aggregate_id, &payload],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_go_to_the_dead_letter_topic_and_the_stream_goes_on() {
    let db = TestDb::new("poison").await;
    allow_null_keys(&db).await;
    let dead_letters = format!("{}.dlq", db.name);
    let _relay = db.relay_with(&[
        "--dead-letter-topic",
        &dead_letters,
        "--kafka-property",
        "message.max.bytes=20000",
    ]);
    let before = insert_raw(&db, "order", Some("k"), "{}").await;
    let null_key = insert_raw(&db, "order", None, r#"{"why": "null key"}"#).await;
    let bad_topic = insert_raw(&db, "no spaces allowed", Some("k"), r#"{"why": "bad topic"}"#).await;
    let too_large = insert_raw(
        &db,
        "order",
        Some("k"),
        &format!(r#"{{"pad": "{}"}}"#, "x".repeat(50_000)),
    )
    .await;
    let after = insert_raw(&db, "order", Some("k"), "{}").await;

    let mut events = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    events.read_until(Duration::from_secs(60), "the good events", |records| records.len() >= 2);
    let mut letters = Consumer::new(&db.bootstrap_servers, &[dead_letters]);
    letters.read_until(Duration::from_secs(60), "three dead letters", |records| {
        records.len() >= 3
    });
    events.read_until_quiet(Duration::from_secs(1));

    let good: Vec<String> = events.records.iter().map(Record::id).collect();
    assert_eq!(good, [before, after.clone()]);
    for (id, says) in [
        (&null_key, "NULL"),
        (&bad_topic, "not legal"),
        (&too_large, "too large"),
    ] {
        let letter = letters.records.iter().find(|r| &r.id() == id).unwrap();
        let error = letter.header("outbox.error").unwrap_or_default();
        assert!(error.contains(says), "dead letter of {id} says {error:?}");
        assert_eq!(letter.header("outbox.error_class").as_deref(), Some("poison"));
        assert!(letter.header("outbox.commit_lsn").is_some_and(|l| l.contains('/')));
    }
    let null_letter = letters.records.iter().find(|r| r.id() == null_key).unwrap();
    assert_eq!(null_letter.payload_json()["why"], "null key", "original bytes kept");
    let large_letter = letters.records.iter().find(|r| r.id() == too_large).unwrap();
    assert!(large_letter.header("outbox.payload_omitted_bytes").is_some());
    db.wait_all_confirmed().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_poison_halt_stops_without_confirming_past_the_poison_event() {
    let db = TestDb::new("halt").await;
    allow_null_keys(&db).await;
    // JSON logs, as a log pipeline would read them.
    let mut relay = db.relay_with(&["--on-poison", "halt", "--log-format", "json"]);
    insert_raw(&db, "order", Some("k"), "{}").await;
    let poison = insert_raw(&db, "order", None, "{}").await;
    insert_raw(&db, "order", Some("k"), "{}").await;
    let status = relay.wait_exit(Duration::from_secs(60));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(4), "{log}");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}")))
        .collect();
    let errors: Vec<String> = lines
        .iter()
        .filter(|line| line["level"] == "ERROR")
        .map(|line| line["fields"].to_string())
        .collect();
    assert!(!errors.is_empty(), "{log}");
    for error in &errors {
        assert!(
            error.contains(&poison) && error.contains("commit LSN"),
            "an error line without the outbox id and LSN: {error}"
        );
    }
    let poison_commit: outbox_relay::lsn::Lsn = log
        .split("at commit LSN ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|lsn| lsn.parse().ok())
        .unwrap();
    let confirmed = db.confirmed_flush_lsn().await;
    assert!(
        confirmed <= poison_commit,
        "confirmed {confirmed} passed the poison event at {poison_commit}"
    );
    db.drop().await;
}
