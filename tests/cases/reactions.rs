//! Issue 10, the relay's reaction to the unexpected: a refusal that waiting cannot fix ends
//! the run with its exit code; a broker that stalls while a new topic is read does not
//! stall the session.

use std::time::Duration;

use crate::support::kafka::Consumer;
use crate::support::{eventually, TestDb};

/// The pid of the walsender streaming this test's slot.
async fn walsender_pid(db: &TestDb) -> Option<i32> {
    db.client
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot],
        )
        .await
        .ok()
        .and_then(|row| row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_loses_replication_ends_the_run_with_exit_code_6() {
    let mut db = TestDb::new("norepl").await;
    let role = format!("{}_r", db.name);
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'pw';
             GRANT CONNECT ON DATABASE {db} TO {role};
             GRANT USAGE ON SCHEMA public TO {role};
             GRANT SELECT ON public.outbox TO {role};",
            db = db.name
        ))
        .await
        .unwrap();
    let rest = db.url.split_once('@').unwrap().1.to_owned();
    db.url = format!("postgres://{role}:pw@{rest}");
    let mut relay = db.relay_with(&["--reconnect-backoff-max", "1s"]);
    let id = db.insert_event("order", "k", "{}").await;
    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "the first event", |r| {
        r.iter().any(|r| r.id() == id)
    });

    let pid = eventually(Duration::from_secs(30), "the relay's walsender", || walsender_pid(&db)).await;
    db.client
        .batch_execute(&format!("ALTER ROLE {role} NOREPLICATION"))
        .await
        .unwrap();
    db.client
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();

    let status = relay.wait_exit(Duration::from_secs(60));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(6), "{log}");
    assert!(log.contains("SQLSTATE 42501"), "{log}");
    assert!(log.contains("ALTER ROLE"), "the message names the fix:\n{log}");
    db.client
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stalling_on_a_new_topic_does_not_stall_the_session() {
    // A private broker, since this test freezes it.
    let broker = devrig::Broker::start().unwrap_or_else(|e| panic!("cannot start tansu: {e}"));
    let mut db = TestDb::new("newtopic").await;
    db.bootstrap_servers = broker.bootstrap_servers();
    // Every walsender of this database gives up on a silent client after 2 s.
    db.client
        .batch_execute(&format!("ALTER DATABASE {} SET wal_sender_timeout = '2s'", db.name))
        .await
        .unwrap();
    let mut relay = db.relay();
    let first = db.insert_event("order", "k", "{}").await;
    let mut consumer = Consumer::new(&broker.bootstrap_servers(), &[db.topic("order"), db.topic("invoice")]);
    consumer.read_until(Duration::from_secs(60), "the warm-up event", |r| {
        r.iter().any(|r| r.id() == first)
    });
    let pid = eventually(Duration::from_secs(30), "the relay's walsender", || walsender_pid(&db)).await;

    // The first event of a new topic while the broker answers nothing: the relay reads
    // the topic's partitions (the fence) and must go on answering the walsender.
    broker.pause();
    let stalled = db.insert_event("invoice", "k", "{}").await;
    eventually(
        Duration::from_secs(30),
        "the relay to wait on the new topic",
        || async { (relay.metric("outbox_relay_topics_being_read") == 1.0).then_some(()) },
    )
    .await;
    // Three wal_sender_timeouts; less than the fence's own 10 s bound on metadata. The slot
    // may move with other tests' WAL, but never past the stalled event (checked below).
    let stalled_at = std::time::Instant::now();
    let mut highest_confirmed = outbox_relay::lsn::Lsn::ZERO;
    while stalled_at.elapsed() < Duration::from_secs(6) {
        highest_confirmed = highest_confirmed.max(db.confirmed_flush_lsn().await);
        assert_eq!(
            walsender_pid(&db).await,
            Some(pid),
            "the walsender changed while the broker stalled:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    broker.resume();
    consumer.read_until(Duration::from_secs(60), "the new topic's event", |r| {
        r.iter().any(|r| r.id() == stalled)
    });
    assert_eq!(walsender_pid(&db).await, Some(pid));
    assert_eq!(
        relay.metric("outbox_relay_reconnects_total"),
        0.0,
        "{}",
        relay.log_text()
    );
    assert_eq!(relay.metric("outbox_relay_topics_being_read"), 0.0);
    let stalled_commit = consumer
        .records
        .iter()
        .find(|r| r.id() == stalled)
        .and_then(|r| r.header("outbox.commit_lsn")?.parse::<outbox_relay::lsn::Lsn>().ok())
        .unwrap();
    assert!(
        highest_confirmed <= stalled_commit,
        "while the topic was read, the slot was confirmed to {highest_confirmed}, past the unpublished event at {stalled_commit}"
    );

    // The test's premise: a client that answers nothing is dropped within a few seconds
    // here, so the walsender above would have changed had the relay stopped answering.
    devrig::kill(relay.pid(), 19); // SIGSTOP
    eventually(
        Duration::from_secs(15),
        "the walsender of a frozen relay to time out",
        || async { (walsender_pid(&db).await != Some(pid)).then_some(()) },
    )
    .await;
    devrig::kill(relay.pid(), 18); // SIGCONT

    // Shutdown is not held up by a stalled topic read either.
    broker.pause();
    db.insert_event("payment", "k", "{}").await;
    eventually(
        Duration::from_secs(30),
        "the relay to wait on another new topic",
        || async { (relay.metric("outbox_relay_topics_being_read") == 1.0).then_some(()) },
    )
    .await;
    let status = relay.terminate(Duration::from_secs(8));
    assert!(status.success(), "{}", relay.log_text());
    broker.resume();
    db.drop().await;
}
