//! Adopting an existing outbox: the seeds' own table shape, a backfill at cutover while
//! applications keep writing (killed halfway and run again), other shapes, bad mappings.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::kafka::{Consumer, Record};
use crate::support::{connect, eventually, stdout_of_success, TestDb};

/// The sample table of the seed documents (their poller marks rows SENT).
const SEEDS_TABLE: &str = "
    CREATE TABLE outbox (
        id serial PRIMARY KEY,
        event_type text NOT NULL,
        payload text NOT NULL,
        status text NOT NULL DEFAULT 'PENDING',
        created_at timestamptz NOT NULL DEFAULT now());
    CREATE PUBLICATION shop_pub FOR TABLE outbox WITH (publish = 'insert');";

/// No aggregate columns in that table: no key, no aggregate_type header.
const SEEDS_COLUMNS: &str = "aggregate_type=,aggregate_id=";

const EVENT_TYPES: [&str; 3] = ["OrderPlaced", "OrderPaid", "OrderShipped"];

/// Applications inserting PENDING rows (and rolling some back) until told to stop.
struct Writers {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    async fn start(url: &str, count: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for writer in 0..count {
            let mut client = connect(url).await;
            let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let event_type = EVENT_TYPES[(n % 3) as usize];
                    let transaction = client.transaction().await.unwrap_or_else(|e| panic!("{e}"));
                    transaction
                        .execute(
                            "INSERT INTO outbox (event_type, payload) VALUES ($1, $2)",
                            &[&event_type, &format!("written by {writer} #{n}")],
                        )
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                    if n.is_multiple_of(10) {
                        // Rolled back: must never be published.
                        transaction.rollback().await.unwrap_or_else(|e| panic!("{e}"));
                    } else {
                        transaction.commit().await.unwrap_or_else(|e| panic!("{e}"));
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        Writers { stop, written, tasks }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap_or_else(|e| panic!("writer failed: {e}"));
        }
        self.written.load(Ordering::Relaxed)
    }
}

/// `outbox-relay <subcommand>` for the seeds' table.
fn seeds_command(db: &TestDb, subcommand: &str) -> std::process::Command {
    let mut command = db.command(subcommand);
    command.env("OUTBOX_RELAY_COLUMNS", SEEDS_COLUMNS);
    command
}

async fn backfill_state(db: &TestDb) -> Option<(String, i64, i64)> {
    db.client
        .query_opt(
            "SELECT state, coalesce(rows, 0), done_through FROM outbox_relay_backfill WHERE slot = $1",
            &[&db.slot],
        )
        .await
        .ok()
        .flatten()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
}

/// The rows that must be published: id -> (event_type, payload).
async fn pending_rows(db: &TestDb) -> HashMap<String, (String, String)> {
    db.client
        .query(
            "SELECT id::text, event_type, payload FROM outbox WHERE status = 'PENDING'",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect()
}

fn topics_of(db: &TestDb) -> Vec<String> {
    EVENT_TYPES
        .iter()
        .map(|event_type| format!("{}.shop.{event_type}", db.name))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_table_is_taken_over_with_every_pending_row_published_once() {
    let mut db = TestDb::empty("adopt_seeds").await;
    db.client
        .batch_execute(SEEDS_TABLE)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    db.publication = "shop_pub".into();
    db.topic_template = format!("{}.shop.{{event_type}}", db.name);
    // 10,000 PENDING rows the poller never sent and 5,000 it did, interleaved.
    db.client
        .batch_execute(
            "INSERT INTO outbox (event_type, payload, status)
             SELECT (ARRAY['OrderPlaced','OrderPaid','OrderShipped'])[1 + i % 3],
                    'payload ' || i || ': plain text, ünïcödé, \"quoted\", not JSON',
                    CASE WHEN i % 3 = 0 THEN 'SENT' ELSE 'PENDING' END
               FROM generate_series(1, 15000) AS i",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let sent: Vec<String> = db
        .client
        .query("SELECT id::text FROM outbox WHERE status = 'SENT'", &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(sent.len(), 5_000);

    let writers = Writers::start(&db.url, 2).await;

    // The backfill, killed halfway: a small window keeps it going long enough to be.
    let mut first = seeds_command(&db, "setup")
        .args(["--backfill", "status = 'PENDING'", "--max-in-flight", "20"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let (state, rows, done) = eventually(Duration::from_secs(60), "the backfill to be under way", || async {
        backfill_state(&db).await.filter(|(_, _, done)| *done >= 2_000)
    })
    .await;
    first.kill().unwrap_or_else(|e| panic!("{e}"));
    let _ = first.wait();
    assert_eq!(state, "ready", "killed while publishing");
    assert!(
        rows >= 10_000 && done < rows,
        "killed halfway: {done} of {rows} confirmed"
    );
    let (_, _, done_at_kill) = backfill_state(&db).await.unwrap_or_default();
    // The manifest never passes an unacknowledged row: every row it counts as done is in Kafka.
    let mut at_kill = Consumer::new(&db.bootstrap_servers, &topics_of(&db));
    at_kill.read_until_quiet(Duration::from_secs(2));
    let in_kafka: std::collections::HashSet<String> = at_kill.records.iter().map(Record::id).collect();
    let done_ids: Vec<String> = db
        .client
        .query(
            &format!(
                "SELECT id::text FROM outbox_relay_backfill_{} WHERE ordinal <= $1",
                db.slot
            ),
            &[&done_at_kill],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(done_ids.len() as i64, done_at_kill);
    let not_in_kafka = done_ids.iter().filter(|id| !in_kafka.contains(*id)).count();
    assert_eq!(not_in_kafka, 0, "rows counted as done but not in Kafka");
    // Move the manifest back by half: those rows are in Kafka, so the resumed run must
    // skip them by the exactly-once fence, not by the manifest.
    let rewound = done_at_kill / 2;
    db.client
        .execute(
            "UPDATE outbox_relay_backfill SET done_through = $2 WHERE slot = $1",
            &[&db.slot, &rewound],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Streaming now would let new events overtake backfilled ones: run refuses.
    let refused = seeds_command(&db, "run").output().unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("unfinished backfill"), "{stderr}");

    // The same command resumes.
    let output = seeds_command(&db, "setup")
        .args(["--backfill", "status = 'PENDING'"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let report = stdout_of_success(&output, "the resumed backfill");
    assert!(report.contains("resuming the backfill"), "{report}");
    eprintln!("adopt_seeds: resumed backfill said:\n{report}");
    let skipped: i64 = report
        .split(" already written")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of rows already written in: {report}"));
    assert!(
        skipped >= done_at_kill - rewound,
        "the fence skipped {skipped} rows, fewer than the {} known to be in Kafka",
        done_at_kill - rewound
    );
    assert_eq!(backfill_state(&db).await.map(|s| s.0), Some("finished".to_owned()));

    // Then run streams what was committed since the slot was created.
    let mut relay =
        crate::support::relay::Relay::start(&db, &["--column", "aggregate_type=", "--column", "aggregate_id="]);
    let before = writers.written.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(30),
        "writers to go on after the cutover",
        || async { (writers.written.load(Ordering::Relaxed) >= before + 200).then_some(()) },
    )
    .await;
    let written = writers.stop().await;
    db.wait_all_confirmed().await;

    let expected = pending_rows(&db).await;
    assert_eq!(
        expected.len() as u64,
        10_000 + written,
        "every committed write is PENDING"
    );
    let mut consumer = Consumer::new(&db.bootstrap_servers, &topics_of(&db));
    consumer.read_until(Duration::from_secs(120), "every PENDING row", |records| {
        records.len() >= expected.len()
    });
    consumer.read_until_quiet(Duration::from_secs(2));
    let mut seen: HashMap<String, u32> = HashMap::new();
    for record in &consumer.records {
        let id = record.id();
        *seen.entry(id.clone()).or_default() += 1;
        let Some((event_type, payload)) = expected.get(&id) else {
            panic!("published a row that is not PENDING (SENT, rolled back or unknown): id {id}");
        };
        assert_eq!(record.topic, format!("{}.shop.{event_type}", db.name));
        assert_eq!(
            record.payload.as_deref(),
            Some(payload.as_bytes()),
            "value byte for byte"
        );
        assert_eq!(record.key, None, "no aggregate_id column: no key");
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    let missing = expected.keys().filter(|id| !seen.contains_key(*id)).count();
    eprintln!(
        "adopt_seeds: {} PENDING rows ({} streamed writes), backfill killed at {done_at_kill} confirmed, {} records, {missing} missing, {} duplicated",
        expected.len(),
        written,
        consumer.records.len(),
        duplicates.len()
    );
    assert_eq!(missing, 0);
    assert!(duplicates.is_empty(), "published twice: {duplicates:?}");
    assert!(sent.iter().all(|id| !seen.contains_key(id)));
    relay.terminate(Duration::from_secs(20));
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_refuses_a_slot_it_did_not_create() {
    let db = TestDb::new("adopt_foreign").await;
    // TestDb::new ran a plain `setup`, which created the slot.
    let output = db
        .command("setup")
        .args(["--backfill", "true"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("was not created by a backfill") && stderr.contains(&db.slot),
        "{stderr}"
    );
    db.drop().await;
}

/// A bad mapping is refused by check and by run, naming the column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mappings_are_refused_with_the_column_named() {
    let db = TestDb::new("adopt_badmap").await;
    for (columns, named) in [("event_type=kind", "\"kind\""), ("aggregate_id=payload", "\"payload\"")] {
        let output = db
            .command("check")
            .env("OUTBOX_RELAY_COLUMNS", columns)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(1), "{stdout}");
        assert!(
            stdout
                .lines()
                .any(|line| line.starts_with("[FAIL] mapping") && line.contains(named)),
            "{columns}: {stdout}"
        );
        let output = db
            .command("run")
            .env("OUTBOX_RELAY_COLUMNS", columns)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{columns}: {stderr}");
        assert!(stderr.contains(named), "{columns}: {stderr}");
    }
    // jsonb as the key is named with its type.
    let output = db
        .command("check")
        .env("OUTBOX_RELAY_COLUMNS", "aggregate_id=payload")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(String::from_utf8_lossy(&output.stdout).contains("jsonb"));
    db.drop().await;
}

/// Helper for the shapes below: the records of `topics` until `count` arrived.
fn read(db: &TestDb, topics: &[String], count: usize) -> Vec<Record> {
    let mut consumer = Consumer::new(&db.bootstrap_servers, topics);
    consumer.read_until(Duration::from_secs(60), "the shape's events", |records| {
        records.len() >= count
    });
    consumer.read_until_quiet(Duration::from_secs(1));
    consumer.records
}

/// `outbox_event` with aggregate columns, a jsonb payload and a status column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_event_table_with_a_status_column() {
    let mut db = TestDb::empty("adopt_event").await;
    db.client
        .batch_execute(
            "CREATE TABLE outbox_event (
                 id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                 aggregate_type text NOT NULL, aggregate_id text NOT NULL, event_type text NOT NULL,
                 payload jsonb NOT NULL, status text NOT NULL DEFAULT 'PENDING',
                 created_at timestamptz NOT NULL DEFAULT clock_timestamp());
             CREATE PUBLICATION outbox_event_pub FOR TABLE outbox_event WITH (publish = 'insert');
             INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload, status)
             SELECT 'order', 'o-' || (i % 7), 'OrderPlaced', jsonb_build_object('n', i),
                    CASE WHEN i <= 30 THEN 'SENT' ELSE 'PENDING' END
               FROM generate_series(1, 100) AS i;",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    db.publication = "outbox_event_pub".into();
    let output = db
        .command("setup")
        .args(["--backfill", "status = 'PENDING'", "--backfill-order", "created_at"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    stdout_of_success(&output, "backfill of outbox_event");
    let mut relay = db.relay();
    db.client
        .batch_execute(
            "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'order', 'o-' || (i % 7), 'OrderPaid', jsonb_build_object('n', i) FROM generate_series(101, 120) AS i",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let records = read(&db, &[db.topic("order")], 90);
    assert_eq!(records.len(), 90, "70 PENDING backfilled + 20 streamed");
    // Per key, in insertion order: backfilled (by created_at) before streamed.
    let mut last: HashMap<String, i64> = HashMap::new();
    for record in &records {
        let n = record.payload_json()["n"].as_i64().unwrap_or_default();
        assert!(n > 30, "a SENT row was published: {n}");
        let previous = last.insert(record.key_text(), n).unwrap_or(0);
        assert!(
            n > previous,
            "key {} out of order: {previous} then {n}",
            record.key_text()
        );
    }
    relay.terminate(Duration::from_secs(20));
    db.drop().await;
}

/// A table keyed by a business column with a bytea payload and its own id column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_keyed_by_a_business_column_with_a_bytea_payload() {
    let mut db = TestDb::empty("adopt_bytea").await;
    db.client
        .batch_execute(
            "CREATE TABLE order_events (
                 event_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 order_id bigint NOT NULL, kind text NOT NULL, body bytea NOT NULL, tenant text);
             CREATE PUBLICATION order_events_pub FOR TABLE order_events WITH (publish = 'insert');
             INSERT INTO order_events (order_id, kind, body, tenant)
             SELECT 1000 + i % 5, 'Created', int4send(i) || '\\x00ff'::bytea, 'acme' FROM generate_series(1, 50) AS i;",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    db.publication = "order_events_pub".into();
    db.topic_template = format!("{}.{{tenant}}.orders", db.name);
    let columns = "id=event_id,aggregate_type=,aggregate_id=order_id,event_type=kind,payload=body";
    let output = db
        .command("setup")
        .args(["--backfill", "true", "--header-column", "tenant=x-tenant"])
        .env("OUTBOX_RELAY_COLUMNS", columns)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    stdout_of_success(&output, "backfill of order_events");
    let check = db
        .command("check")
        .env("OUTBOX_RELAY_COLUMNS", columns)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let checklist = stdout_of_success(&check, "check of order_events");
    assert!(
        checklist.contains("a row of it becomes") && checklist.contains("key     \"100"),
        "{checklist}"
    );
    let mut relay = crate::support::relay::Relay::start(
        &db,
        &[
            "--column",
            "id=event_id",
            "--column",
            "aggregate_type=",
            "--column",
            "aggregate_id=order_id",
            "--column",
            "event_type=kind",
            "--column",
            "payload=body",
            "--header-column",
            "tenant=x-tenant",
        ],
    );
    db.client
        .batch_execute(
            "INSERT INTO order_events (order_id, kind, body, tenant)
             SELECT 1000 + i % 5, 'Paid', int4send(i) || '\\x00ff'::bytea, 'acme' FROM generate_series(51, 60) AS i",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let topic = format!("{}.acme.orders", db.name);
    let records = read(&db, &[topic], 60);
    assert_eq!(records.len(), 60);
    let mut last: HashMap<String, i32> = HashMap::new();
    for record in &records {
        let body = record.payload.clone().unwrap_or_default();
        assert_eq!(body.len(), 6, "bytea published as its bytes");
        assert_eq!(&body[4..], &[0, 255]);
        let n = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        assert_eq!(record.key_text(), (1000 + n % 5).to_string());
        assert_eq!(record.header("x-tenant").as_deref(), Some("acme"));
        assert_eq!(
            record.header("event_type").as_deref(),
            Some(if n <= 50 { "Created" } else { "Paid" })
        );
        let previous = last.insert(record.key_text(), n).unwrap_or(0);
        assert!(n > previous, "key {} out of order", record.key_text());
    }
    relay.terminate(Duration::from_secs(20));
    db.drop().await;
}

/// `replay` re-publishes exactly the rows asked for, to another topic, marked with the run,
/// without touching the slot; dry runs publish nothing; gone rows and bad SQL are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_publishes_exactly_the_rows_asked_for() {
    let db = TestDb::empty("adopt_replay").await;
    db.client
        .batch_execute(SEEDS_TABLE)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    db.client
        .batch_execute(
            "INSERT INTO outbox (event_type, payload) SELECT 'OrderPlaced', 'row ' || i FROM generate_series(1, 100) AS i",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // A slot the replay must leave alone.
    db.client
        .batch_execute("SELECT pg_create_logical_replication_slot(current_database(), 'pgoutput')")
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    let db = TestDb {
        publication: "shop_pub".into(),
        topic_template: format!("{}.shop.{{event_type}}", db.name),
        ..db
    };
    let slot_before = db.confirmed_flush_lsn().await;
    let replay = |args: &[&str]| {
        seeds_command(&db, "replay")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let topic = format!("{}.replayed", db.name);

    let dry = replay(&[
        "--where",
        "id between 20 and 59",
        "--topic-template",
        &topic,
        "--dry-run",
    ]);
    let dry = stdout_of_success(&dry, "dry run");
    assert!(
        dry.contains("40 rows") && dry.contains(&format!("{topic}: 40")),
        "{dry}"
    );

    let output = replay(&[
        "--where",
        "id between 20 and 59",
        "--topic-template",
        &topic,
        "--run-name",
        "fix-consumer-bug",
    ]);
    let report = stdout_of_success(&output, "replay");
    assert!(report.contains("40 published"), "{report}");
    let records = read(&db, std::slice::from_ref(&topic), 40);
    let mut ids: Vec<i64> = records.iter().map(|r| r.id().parse().unwrap_or_default()).collect();
    assert_eq!(
        records.len(),
        40,
        "the dry run published nothing, the replay each row once"
    );
    for record in &records {
        assert_eq!(record.header("outbox.replay").as_deref(), Some("fix-consumer-bug"));
        assert_eq!(
            record.header("outbox.commit_lsn"),
            None,
            "no position the fence could take"
        );
        let id: i64 = record.id().parse().unwrap_or_default();
        assert_eq!(record.payload.as_deref(), Some(format!("row {id}").as_bytes()));
    }
    // In id order within each partition (keyless events are spread by id).
    let mut by_partition: HashMap<i32, Vec<i64>> = HashMap::new();
    for record in &records {
        by_partition
            .entry(record.partition)
            .or_default()
            .push(record.id().parse().unwrap_or_default());
    }
    for ids in by_partition.values() {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "out of id order: {ids:?}");
    }
    ids.sort_unstable();
    assert_eq!(ids, (20..=59).collect::<Vec<i64>>());

    // --id, to the rows' own topic.
    let output = replay(&["--id", "7", "--id", "8"]);
    stdout_of_success(&output, "replay by id");
    let own = read(&db, &[format!("{}.shop.OrderPlaced", db.name)], 2);
    assert_eq!(own.len(), 2);

    // --since and --until compare created_at.
    let window = replay(&[
        "--since",
        "2000-01-01T00:00:00Z",
        "--until",
        "2100-01-01T00:00:00Z",
        "--dry-run",
    ]);
    let window = stdout_of_success(&window, "a time window");
    assert!(window.contains("100 rows"), "{window}");

    // Gone rows and bad SQL are clear errors.
    db.client
        .batch_execute("DELETE FROM outbox WHERE id > 90")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let gone = replay(&["--where", "id > 90"]);
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert_eq!(gone.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot be replayed"), "{stderr}");
    let bad = replay(&["--where", "no_such_column = 1"]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no_such_column"), "{stderr}");

    assert_eq!(
        db.confirmed_flush_lsn().await,
        slot_before,
        "replay never touches the slot"
    );
    db.drop().await;
}
