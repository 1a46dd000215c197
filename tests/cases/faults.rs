//! Faults: broker outage, relay killed, relay stopped.

use std::collections::HashSet;
use std::time::Duration;

use crate::cases::delivery::assert_commit_order_per_key;
use crate::support::kafka::Consumer;
use crate::support::relay::Relay;
use crate::support::{connect, Record, TestDb};

/// How long the broker stays frozen.
const OUTAGE: Duration = Duration::from_secs(60);

/// Waits until the relay has confirmed everything written so far (so every record it
/// published is in the topic), then reads until the topic has been quiet for a second:
/// a late duplicate is counted, not missed.
async fn read_until_settled(db: &TestDb, consumer: &mut Consumer) {
    db.wait_all_confirmed().await;
    consumer.read_until_quiet(Duration::from_secs(1));
}

/// The time of the walsender's last standby status reply for this test's slot.
async fn last_reply(db: &TestDb) -> Option<String> {
    db.client
        .query_opt(
            "SELECT r.reply_time::text FROM pg_stat_replication r
               JOIN pg_replication_slots s ON s.active_pid = r.pid
              WHERE s.slot_name = $1",
            &[&db.slot],
        )
        .await
        .ok()
        .flatten()
        .and_then(|row| row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_never_lets_the_slot_pass_an_unacknowledged_event() {
    // A private broker, since this test freezes it.
    let broker = devrig::Broker::start().unwrap_or_else(|e| panic!("cannot start tansu: {e}"));
    let db = TestDb::new("outage").await;
    let _relay = Relay::start_with_servers(&db, &broker.bootstrap_servers(), &[]);
    let warm_up = db.insert_event("order", "k0", "{}").await;
    let mut consumer = Consumer::new(&broker.bootstrap_servers(), &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "the warm-up event", |r| !r.is_empty());
    assert_eq!(consumer.records[0].id(), warm_up);
    db.wait_all_confirmed().await;

    broker.pause();
    let mut outage_ids = HashSet::new();
    for i in 0..20 {
        outage_ids.insert(db.insert_event("order", &format!("k{}", i % 3), "{}").await);
    }
    // Keep the broker frozen for a minute, watching the slot across the relay's status
    // updates. Other tests write WAL on the shared server, so the slot may move up to the
    // first outage event's commit, but never past it: checked once that LSN is known.
    let paused_at = std::time::Instant::now();
    let mut replies = HashSet::new();
    let mut highest_confirmed = outbox_relay::lsn::Lsn::ZERO;
    while replies.len() < 3 || paused_at.elapsed() < OUTAGE {
        highest_confirmed = highest_confirmed.max(db.confirmed_flush_lsn().await);
        if let Some(reply) = last_reply(&db).await {
            replies.insert(reply);
        }
        assert!(
            paused_at.elapsed() < OUTAGE + Duration::from_secs(30),
            "no status updates from the relay during the outage"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    broker.resume();
    let mut ids = outage_ids.clone();
    ids.insert(warm_up);
    consumer.read_until(Duration::from_secs(90), "every event after the outage", |records| {
        records.iter().map(Record::id).collect::<HashSet<_>>() == ids
    });
    read_until_settled(&db, &mut consumer).await;
    assert_eq!(consumer.records.len(), ids.len(), "duplicates after the outage");
    let first_outage_commit = consumer
        .records
        .iter()
        .filter(|r| outage_ids.contains(&r.id()))
        .filter_map(|r| r.header("outbox.commit_lsn")?.parse::<outbox_relay::lsn::Lsn>().ok())
        .min()
        .unwrap();
    assert!(
        highest_confirmed <= first_outage_commit,
        "during the outage confirmed_flush_lsn reached {highest_confirmed}, past the unacknowledged event committed at {first_outage_commit}"
    );
    db.wait_all_confirmed().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_mid_stream_loses_nothing_after_restart() {
    let db = TestDb::new("sigkill").await;
    let mut relay = db.relay();
    let url = db.url.clone();
    let writer = tokio::spawn(async move {
        let client = connect(&url).await;
        let mut ids = Vec::new();
        for i in 0..3_000 {
            ids.push(crate::support::insert_event(&client, "order", &format!("k{}", i % 17), "{}").await);
        }
        ids
    });
    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "some events before the kill", |r| {
        r.len() >= 500
    });
    relay.kill_hard();
    let restarted = db.relay();

    let ids: HashSet<String> = writer.await.unwrap_or_else(|e| panic!("{e}")).into_iter().collect();
    consumer.read_until(Duration::from_secs(120), "every committed event", |records| {
        records.iter().map(Record::id).collect::<HashSet<_>>().is_superset(&ids)
    });
    read_until_settled(&db, &mut consumer).await;
    let unique: HashSet<String> = consumer.records.iter().map(Record::id).collect();
    let duplicates = consumer.records.len() - unique.len();
    eprintln!(
        "sigkill: {} committed, {} received, {duplicates} duplicates",
        ids.len(),
        consumer.records.len()
    );
    assert_eq!(unique, ids, "missing or unexpected events");
    assert_eq!(duplicates, 0, "exactly-once publishing wrote duplicates");
    assert_commit_order_per_key(&consumer.records);
    drop(restarted);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_confirms_what_was_acknowledged_and_exits_zero() {
    let db = TestDb::new("sigterm").await;
    let mut relay = db.relay();
    let mut ids = HashSet::new();
    for i in 0..200 {
        ids.insert(db.insert_event("order", &format!("k{}", i % 7), "{}").await);
    }
    let written_up_to = db.current_wal_lsn().await;
    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "every event", |records| {
        records.iter().map(Record::id).collect::<HashSet<_>>() == ids
    });
    let status = relay.terminate(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "log:\n{}", relay.log_text());
    assert!(
        db.confirmed_flush_lsn().await >= written_up_to,
        "the final position was not confirmed"
    );

    // A restart publishes nothing again.
    let _again = db.relay();
    let marker = db.insert_event("order", "marker", "{}").await;
    consumer.read_until(Duration::from_secs(60), "the marker", |records| {
        records.iter().any(|r| r.id() == marker)
    });
    read_until_settled(&db, &mut consumer).await;
    assert_eq!(consumer.records.len(), ids.len() + 1, "events were published twice");
    assert_commit_order_per_key(&consumer.records);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_replication_connection_is_resumed() {
    let db = TestDb::new("reconnect").await;
    let relay = db.relay();
    let mut ids = HashSet::new();
    for i in 0..100 {
        ids.insert(db.insert_event("order", &format!("k{}", i % 4), "{}").await);
    }
    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "the first events", |records| {
        records.len() >= 100
    });

    // Kill the walsender serving the relay, as a network cut or a failover would.
    let terminated: bool = db
        .client
        .query_one(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot],
        )
        .await
        .unwrap()
        .get::<_, Option<bool>>(0)
        .unwrap_or(false);
    assert!(terminated, "no walsender to terminate");
    for i in 0..100 {
        ids.insert(db.insert_event("order", &format!("k{}", i % 4), "{}").await);
    }
    consumer.read_until(Duration::from_secs(60), "every event after the reconnect", |records| {
        records.iter().map(Record::id).collect::<HashSet<_>>() == ids
    });
    read_until_settled(&db, &mut consumer).await;
    assert_eq!(
        consumer.records.len(),
        ids.len(),
        "events were published twice across the reconnect"
    );
    assert!(
        relay
            .log_text()
            .contains("resuming from the last acknowledged position"),
        "{}",
        relay.log_text()
    );
    db.drop().await;
}
