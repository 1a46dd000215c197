//! What arrives in Kafka: exactly the committed events, in commit order per key.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::support::kafka::Consumer;
use crate::support::{connect, Record, TestDb};

/// A small deterministic generator (xorshift), so failures can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What one writer did.
#[derive(Default)]
struct Written {
    committed: Vec<String>,
    rolled_back: Vec<String>,
}

const INSERT: &str = "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                      VALUES ($1, $2, 'Tested', $3::text::jsonb) RETURNING id::text";

/// Writes `target` committed events in transactions of 1-4 events, some rolled back and
/// some with a savepoint rolled back. Keys `w<writer>-<k>` belong to this writer (so its
/// sequence numbers are in commit order); keys `shared-<k>` are written by everyone.
async fn write(url: String, writer: u64, target: usize) -> Written {
    let mut client = connect(&url).await;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (writer + 1));
    let mut written = Written::default();
    let mut seq = 0u64;
    while written.committed.len() < target {
        let transaction = client.transaction().await.unwrap_or_else(|e| panic!("{e}"));
        let mut ids = Vec::new();
        let choice = rng.below(10);
        let count = (1 + rng.below(4) as usize).min(target - written.committed.len());
        for _ in 0..count {
            let (aggregate_type, key) = if rng.below(5) == 0 {
                ("customer", format!("shared-{}", rng.below(3)))
            } else {
                ("order", format!("w{writer}-{}", rng.below(6)))
            };
            seq += 1;
            let payload = format!(r#"{{"writer": {writer}, "seq": {seq}}}"#);
            let row = transaction
                .query_one(INSERT, &[&aggregate_type, &key, &payload])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            ids.push(row.get::<_, String>(0));
        }
        match choice {
            0 => {
                transaction.rollback().await.unwrap_or_else(|e| panic!("{e}"));
                written.rolled_back.extend(ids);
            }
            1 | 2 => {
                transaction
                    .batch_execute("SAVEPOINT s")
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                for _ in 0..2 {
                    seq += 1;
                    let payload = format!(r#"{{"writer": {writer}, "seq": {seq}}}"#);
                    let row = transaction
                        .query_one(INSERT, &[&"order", &format!("w{writer}-0"), &payload])
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                    written.rolled_back.push(row.get(0));
                }
                transaction
                    .batch_execute("ROLLBACK TO SAVEPOINT s")
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                transaction.commit().await.unwrap_or_else(|e| panic!("{e}"));
                written.committed.extend(ids);
            }
            _ => {
                transaction.commit().await.unwrap_or_else(|e| panic!("{e}"));
                written.committed.extend(ids);
            }
        }
    }
    written
}

/// A record's source position from its headers (`outbox.commit_lsn`, `outbox.tx_index`),
/// whatever the broker: `header` reads one header's text.
pub fn source_position(header: impl Fn(&str) -> Option<String>) -> (outbox_relay::lsn::Lsn, u32) {
    let lsn = header("outbox.commit_lsn")
        .and_then(|t| t.parse().ok())
        .unwrap_or_default();
    let index = header("outbox.tx_index")
        .and_then(|t| t.parse().ok())
        .unwrap_or_default();
    (lsn, index)
}

/// Checks that, per key, records sit in one partition and their source positions (and
/// the writers' own sequence numbers) increase with the offset.
pub fn assert_commit_order_per_key(records: &[Record]) {
    let mut by_key: HashMap<String, Vec<&Record>> = HashMap::new();
    for record in records {
        by_key.entry(record.key_text()).or_default().push(record);
    }
    for (key, mut list) in by_key {
        let partitions: HashSet<(String, i32)> = list.iter().map(|r| (r.topic.clone(), r.partition)).collect();
        assert_eq!(partitions.len(), 1, "key {key} spread over {partitions:?}");
        list.sort_by_key(|r| r.offset);
        let positions: Vec<(outbox_relay::lsn::Lsn, u32)> =
            list.iter().map(|r| source_position(|name| r.header(name))).collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "key {key}: source positions out of commit order: {positions:?}"
        );
        // Payloads written by one writer carry its sequence number, in commit order.
        let seqs: Vec<u64> = list.iter().filter_map(|r| r.payload_json()["seq"].as_u64()).collect();
        if key.starts_with('w') && seqs.len() == list.len() {
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "key {key}: writer sequence out of order: {seqs:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_the_committed_events_arrive_in_commit_order_per_key() {
    let db = TestDb::new("delivery").await;
    let _relay = db.relay();
    let writers: Vec<_> = (0..8).map(|w| tokio::spawn(write(db.url.clone(), w, 1_250))).collect();
    let mut committed = HashSet::new();
    let mut rolled_back = HashSet::new();
    for writer in writers {
        let written = writer.await.unwrap_or_else(|e| panic!("{e}"));
        committed.extend(written.committed);
        rolled_back.extend(written.rolled_back);
    }
    assert_eq!(committed.len(), 10_000);
    assert!(
        rolled_back.len() > 1_000,
        "the workload rolled back too little: {}",
        rolled_back.len()
    );

    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order"), db.topic("customer")]);
    consumer.read_until(Duration::from_secs(120), "all committed events", |records| {
        records
            .iter()
            .filter(|r| committed.contains(&r.id()))
            .map(Record::id)
            .collect::<HashSet<_>>()
            .len()
            == committed.len()
    });
    consumer.read_until_quiet(Duration::from_secs(1));

    let received: Vec<String> = consumer.records.iter().map(Record::id).collect();
    let unique: HashSet<&String> = received.iter().collect();
    let phantoms: Vec<&&String> = unique.iter().filter(|id| rolled_back.contains(**id)).collect();
    assert!(phantoms.is_empty(), "rolled-back events were published: {phantoms:?}");
    assert_eq!(unique.len(), committed.len(), "unexpected ids");
    assert_eq!(received.len(), unique.len(), "duplicates in a run without faults");
    assert_commit_order_per_key(&consumer.records);
    let partitions: HashSet<(String, i32)> = consumer
        .records
        .iter()
        .map(|r| (r.topic.clone(), r.partition))
        .collect();
    assert!(partitions.len() > 2, "54 keys used only {partitions:?}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_carry_key_value_and_headers_from_the_row() {
    let db = TestDb::new("mapping").await;
    let _relay = db.relay();
    let id: String = db
        .client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
             VALUES ('order', 'order-7', 'OrderPlaced', '{\"total\": 5}', '{\"traceparent\": \"00-abc-01\", \"tenant\": 42}')
             RETURNING id::text",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .get(0);
    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "the event", |records| !records.is_empty());
    let record = &consumer.records[0];
    assert_eq!(record.key_text(), "order-7");
    assert_eq!(record.payload.as_deref(), Some(&b"{\"total\": 5}"[..]));
    assert_eq!(record.header("id"), Some(id));
    assert_eq!(record.header("event_type").as_deref(), Some("OrderPlaced"));
    assert_eq!(record.header("aggregate_type").as_deref(), Some("order"));
    assert_eq!(record.header("traceparent").as_deref(), Some("00-abc-01"));
    assert_eq!(record.header("tenant").as_deref(), Some("42"));
    assert_eq!(record.header("outbox.tx_index").as_deref(), Some("0"));
    assert!(record.header("outbox.commit_lsn").is_some_and(|l| l.contains('/')));
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_change_mid_stream_loses_nothing() {
    let db = TestDb::new("schema").await;
    let _relay = db.relay();
    let mut ids = HashSet::new();
    for i in 0..50 {
        ids.insert(db.insert_event("order", &format!("k{}", i % 5), "{}").await);
    }
    db.client
        .batch_execute("ALTER TABLE outbox ADD COLUMN tenant text DEFAULT 'acme'")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..50 {
        ids.insert(db.insert_event("order", &format!("k{}", i % 5), "{}").await);
    }
    db.client
        .batch_execute("ALTER TABLE outbox DROP COLUMN headers")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..50 {
        ids.insert(db.insert_event("order", &format!("k{}", i % 5), "{}").await);
    }
    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "150 events", |records| {
        records.iter().map(Record::id).collect::<HashSet<_>>() == ids
    });
    assert_commit_order_per_key(&consumer.records);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_other_tables_still_advance_the_slot() {
    let db = TestDb::new("idle").await;
    let _relay = db.relay();
    db.insert_event("order", "k", "{}").await;
    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "the first event", |records| {
        !records.is_empty()
    });

    db.client
        .batch_execute("CREATE TABLE unrelated (n int); INSERT INTO unrelated SELECT generate_series(1, 1000);")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for n in 0..20 {
        db.client
            .execute("INSERT INTO unrelated VALUES ($1)", &[&n])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let target = db.current_wal_lsn().await;
    db.wait_confirmed(target, Duration::from_secs(30)).await;
    db.drop().await;
}
