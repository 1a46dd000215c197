//! Issue 9, failover: a primary and a streaming standby, writers running throughout, the
//! primary killed (immediate stop) and the standby promoted, the relay given one
//! multi-host URL. With failover slots (PostgreSQL 17+) the relay resumes on the promoted
//! server from the synced slot: every event in its outbox table published exactly once,
//! in per-key order, and the relay never exits. Before 17 the slot is gone: the relay
//! exits with code 3 and the runbook's message, and the runbook republishes the rest.
//!
//! Runs on PostgreSQL 18 and 15 by default, and on every major >= 17 listed in
//! `TEST_PG_MAJORS` (installed by `scripts/install-deps`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::kafka::Consumer;
use crate::support::{connect, eventually, Record, TestDb};

/// The standby's physical slot on the primary.
const STANDBY_SLOT: &str = "standby1";

/// The majors to run the failover-slot case on.
fn failover_majors() -> Vec<u32> {
    let mut majors = vec![18];
    if let Ok(list) = std::env::var("TEST_PG_MAJORS") {
        majors.extend(
            list.split(',')
                .filter_map(|m| m.trim().parse::<u32>().ok())
                .filter(|m| *m >= 17),
        );
    }
    majors.sort_unstable();
    majors.dedup();
    majors
}

/// A primary of `major` and its standby; the primary's settings apply to both.
fn pair(major: u32, standby_settings: &[&str]) -> (devrig::Postgres, devrig::Postgres) {
    let primary = devrig::Postgres::start_configured(&devrig::Options {
        major: Some(major),
        ..devrig::Options::default()
    })
    .unwrap_or_else(|e| panic!("cannot start PostgreSQL {major}: {e}"));
    let standby = devrig::Postgres::start_standby(&primary, STANDBY_SLOT, standby_settings)
        .unwrap_or_else(|e| panic!("cannot start a standby of PostgreSQL {major}: {e}"));
    (primary, standby)
}

/// `db.url` naming both servers, primary first, for read-write sessions.
fn multi_host_url(db: &TestDb, primary: &devrig::Postgres, standby: &devrig::Postgres) -> String {
    format!(
        "postgres://postgres:{}@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write",
        primary.password, primary.port, standby.port, db.name
    )
}

/// Writers inserting single-row transactions through the multi-host URL, reconnecting
/// through the failover, until stopped. Each writer has its own keys, and its payloads
/// carry a sequence number that grows in commit order.
struct Writers {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(url: &str, count: u64) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let tasks = (0..count)
            .map(|writer| {
                let (url, stop, committed) = (url.to_owned(), Arc::clone(&stop), Arc::clone(&committed));
                tokio::spawn(async move {
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((client, connection)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                        else {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        };
                        tokio::spawn(connection);
                        while !stop.load(Ordering::Relaxed) {
                            seq += 1;
                            let key = format!("w{writer}-{}", seq % 4);
                            let payload = format!(r#"{{"writer": {writer}, "seq": {seq}}}"#);
                            let inserted = client
                                .execute(
                                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                                     VALUES ('order', $1, 'Tested', $2::text::jsonb)",
                                    &[&key, &payload],
                                )
                                .await;
                            match inserted {
                                Ok(_) => committed.fetch_add(1, Ordering::Relaxed),
                                Err(_) => break,
                            };
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                })
            })
            .collect();
        Writers { stop, committed, tasks }
    }

    fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Waits until `count` rows in all have been committed (through the failover).
    async fn wait_for(&self, count: u64) {
        eventually(
            Duration::from_secs(60),
            "writers to commit on the promoted server",
            || async { (self.committed() >= count).then_some(()) },
        )
        .await;
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// (id, aggregate_id, payload seq) of every row in the server's outbox table.
async fn table_rows(url: &str) -> Vec<(String, String, u64)> {
    connect(url)
        .await
        .query(
            "SELECT id::text, aggregate_id, (payload->>'seq')::bigint FROM outbox ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get::<_, i64>(2) as u64))
        .collect()
}

/// Every row of `rows` in `records` exactly once, nothing else, per-key order kept.
fn assert_exactly_once_in_order(rows: &[(String, String, u64)], records: &[Record]) {
    let expected: HashSet<&str> = rows.iter().map(|(id, _, _)| id.as_str()).collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for record in records {
        *seen.entry(record.id()).or_default() += 1;
    }
    let missing: Vec<&&str> = expected.iter().filter(|id| !seen.contains_key(**id)).collect();
    let duplicated: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    let phantom: Vec<&String> = seen.keys().filter(|id| !expected.contains(id.as_str())).collect();
    assert!(
        missing.is_empty(),
        "{} events missing, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    assert!(
        duplicated.is_empty(),
        "{} events duplicated, e.g. {:?}",
        duplicated.len(),
        duplicated.first()
    );
    assert!(
        phantom.is_empty(),
        "{} phantom events (not in the promoted table), e.g. {:?}",
        phantom.len(),
        phantom.first()
    );
    let mut last: HashMap<String, u64> = HashMap::new();
    for record in records {
        let seq = record.payload_json()["seq"].as_u64().unwrap_or(0);
        let key = record.key_text();
        if let Some(previous) = last.insert(key.clone(), seq) {
            assert!(previous < seq, "key {key}: seq {seq} after {previous}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_promoted_standby_resumes_from_the_synced_failover_slot() {
    for major in failover_majors() {
        failover_with_failover_slots(major).await;
    }
}

async fn failover_with_failover_slots(major: u32) {
    let (mut primary, standby) = pair(major, &["sync_replication_slots = on", "hot_standby_feedback = on"]);
    let mut db = TestDb::on(
        &primary,
        &crate::support::services().bootstrap_servers,
        &format!("fo{major}"),
    )
    .await;
    let admin = connect(&primary.url("postgres")).await;
    for statement in [
        format!("ALTER SYSTEM SET synchronized_standby_slots = '{STANDBY_SLOT}'"),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        admin.batch_execute(&statement).await.unwrap();
    }
    db.url = multi_host_url(&db, &primary, &standby);
    let mut relay = db.relay_with(&["--reconnect-backoff-max", "1s", "--heartbeat-interval", "1s"]);
    let writers = Writers::start(&db.url, 2);

    // check sees the failover slot, the setting and the standby's synced copy.
    let check_text = eventually(
        Duration::from_secs(120),
        "the standby to hold a synced copy of the slot",
        || async {
            let output = db.command("check").output().unwrap();
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.contains("holds a synced copy").then_some(text)
        },
    )
    .await;
    assert!(
        check_text.contains(&format!("[ok  ] slot {} is failover-enabled", db.slot)),
        "{check_text}"
    );
    assert!(
        check_text.contains("[ok  ] synchronized_standby_slots = 'standby1'"),
        "{check_text}"
    );

    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "events before the failover", |r| {
        r.len() >= 200
    });
    let before = outbox_relay::postgres::slot::server_identity(&admin).await.unwrap();
    primary.crash();
    standby.promote().unwrap_or_else(|e| panic!("{e}"));
    // What the relay tells servers apart by: the same cluster, a new timeline, so it
    // resumes from the promoted server's copy of the slot rather than its own memory.
    let promoted_admin = connect(&standby.url("postgres")).await;
    let after = outbox_relay::postgres::slot::server_identity(&promoted_admin)
        .await
        .unwrap();
    assert_eq!(before.0, after.0, "a promoted standby keeps the system identifier");
    assert_ne!(before.1, after.1, "a promotion starts a new timeline");
    let at_promotion = writers.committed();
    writers.wait_for(at_promotion + 200).await;
    writers.stop().await;

    let promoted = standby.url(&db.name);
    let rows = table_rows(&promoted).await;
    consumer.read_until(Duration::from_secs(120), "every row of the promoted table", |records| {
        let ids: HashSet<String> = records.iter().map(Record::id).collect();
        rows.iter().all(|(id, _, _)| ids.contains(id))
    });
    consumer.read_until_quiet(Duration::from_secs(3));
    assert!(relay.is_running(), "the relay exited:\n{}", relay.log_text());
    assert_exactly_once_in_order(&rows, &consumer.records);
    let log = relay.log_text();
    let resumed = format!("streaming slot={} publication=outbox_pub", db.slot);
    assert!(
        log.lines()
            .any(|l| l.contains(&resumed) && l.contains(&format!("server=127.0.0.1:{}", standby.port))),
        "the relay did not resume on the promoted server:\n{log}"
    );
    println!(
        "PostgreSQL {major}: {} events, {} after the promotion, exactly once across the failover",
        rows.len(),
        rows.len() as u64 - at_promotion.min(rows.len() as u64)
    );
    assert!(
        relay.terminate(Duration::from_secs(15)).success(),
        "{}",
        relay.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_failover_slots_the_relay_exits_3_and_the_runbook_republishes() {
    let major = 15;
    let (mut primary, standby) = pair(major, &["hot_standby_feedback = on"]);
    let mut db = TestDb::on(&primary, &crate::support::services().bootstrap_servers, "fo15").await;
    db.url = multi_host_url(&db, &primary, &standby);
    let mut relay = db.relay_with(&["--reconnect-backoff-max", "1s"]);
    let writers = Writers::start(&db.url, 2);
    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "events before the failover", |r| {
        r.len() >= 100
    });
    primary.crash();
    standby.promote().unwrap_or_else(|e| panic!("{e}"));
    let status = relay.wait_exit(Duration::from_secs(90));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(
        log.contains("is gone") && log.contains("docs/operations.md#failover-without-failover-slots"),
        "{log}"
    );
    let published_before = log
        .split("Every event committed before ")
        .nth(1)
        .and_then(|rest| rest.split(" was published").next())
        .unwrap_or_else(|| panic!("no time in the message:\n{log}"))
        .to_owned();
    let at_exit = writers.committed();
    writers.wait_for(at_exit + 50).await;

    // The runbook: recreate the slot, start the relay, republish what may be missing.
    db.setup();
    let mut relay = db.relay();
    writers.stop().await;
    let promoted = connect(&standby.url(&db.name)).await;
    promoted
        .batch_execute(&runbook_republish(&published_before))
        .await
        .unwrap();
    let rows = table_rows(&standby.url(&db.name)).await;
    consumer.read_until(
        Duration::from_secs(120),
        "every row of the promoted table after the runbook",
        |records| {
            let ids: HashSet<String> = records.iter().map(Record::id).collect();
            rows.iter().all(|(id, _, _)| ids.contains(id))
        },
    );
    assert!(
        relay.terminate(Duration::from_secs(15)).success(),
        "{}",
        relay.log_text()
    );
}

/// The republishing statement of docs/operations.md's runbook, for `since`.
fn runbook_republish(since: &str) -> String {
    let docs = std::fs::read_to_string(format!("{}/docs/operations.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let statement = docs
        .split("```sql\n-- republish\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap_or_else(|| panic!("docs/operations.md has no ```sql -- republish block"));
    statement.replace("<published before>", since)
}
