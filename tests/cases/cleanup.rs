//! Issue 5, outbox cleanup (`--retention`): only published rows are deleted.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::kafka::Consumer;
use crate::support::relay::Relay;
use crate::support::{eventually, Record, TestDb};

async fn outbox_ids(db: &TestDb) -> HashSet<String> {
    db.client
        .query("SELECT id::text FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_published_rows_and_never_an_unacknowledged_one() {
    // A private broker, since this test freezes it.
    let broker = devrig::Broker::start().unwrap_or_else(|e| panic!("cannot start tansu: {e}"));
    let db = TestDb::new("retention").await;
    let relay = Relay::start_with_servers(
        &db,
        &broker.bootstrap_servers(),
        &["--retention", "1s", "--heartbeat-interval", "1s"],
    );
    let mut consumer = Consumer::new(&broker.bootstrap_servers(), &[db.topic("order")]);

    let mut published = HashSet::new();
    for i in 0..30 {
        published.insert(db.insert_event("order", &format!("k{i}"), "{}").await);
    }
    consumer.read_until(Duration::from_secs(60), "the first events", |records| {
        records.iter().map(Record::id).collect::<HashSet<_>>() == published
    });
    eventually(
        Duration::from_secs(30),
        "published rows to be deleted and counted",
        || async {
            (outbox_ids(&db).await.is_empty() && relay.metric("outbox_relay_rows_cleaned_total") == 30.0).then_some(())
        },
    )
    .await;

    // With the broker frozen nothing new is acknowledged, so nothing new may go.
    broker.pause();
    let mut unacknowledged = HashSet::new();
    for i in 0..10 {
        unacknowledged.insert(db.insert_event("order", &format!("k{i}"), "{}").await);
    }
    // Every pass takes a mark; wait until marks taken after these inserts are older than
    // the retention, so only the missing acknowledgement can hold the rows back.
    let passes = relay.metric("outbox_relay_cleanup_passes_total");
    eventually(Duration::from_secs(30), "four more cleanup passes", || async {
        (relay.metric("outbox_relay_cleanup_passes_total") >= passes + 4.0).then_some(())
    })
    .await;
    assert_eq!(
        outbox_ids(&db).await,
        unacknowledged,
        "an unacknowledged row was deleted"
    );
    assert_eq!(relay.metric("outbox_relay_rows_cleaned_total"), 30.0);

    broker.resume();
    let everything: HashSet<_> = published.union(&unacknowledged).cloned().collect();
    consumer.read_until(Duration::from_secs(90), "the events after the freeze", |records| {
        records.iter().map(Record::id).collect::<HashSet<_>>() == everything
    });
    eventually(
        Duration::from_secs(60),
        "the now published rows to be deleted and counted",
        || async {
            (outbox_ids(&db).await.is_empty() && relay.metric("outbox_relay_rows_cleaned_total") == 40.0).then_some(())
        },
    )
    .await;
    db.drop().await;
}
