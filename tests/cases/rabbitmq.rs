//! Issue 12: the RabbitMQ sink against a real RabbitMQ node (Debian's rabbitmq-server,
//! started privately): publisher confirms as the acknowledgement, properties, commit order
//! per key, unroutable events dead-lettered, setup and check, and the crash loop with a
//! broker restart.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_relay::lsn::Lsn;

use crate::cases::delivery::source_position;
use crate::cases::guarantees::write_mixed;
use crate::support::rabbitmq::{self, Message, Queue};
use crate::support::{eventually, stdout_of_success, Relay, TestDb};

/// The flags that point a relay (or setup, or check) at RabbitMQ.
fn sink_args<'a>(url: &'a str, exchange: &'a str) -> [&'a str; 6] {
    ["--sink", "rabbitmq", "--amqp-url", url, "--amqp-exchange", exchange]
}

/// The dead-letter routing key (and queue) of `db`, as `setup` declares it.
fn dead_letters(db: &TestDb) -> String {
    format!("{}.dlq", db.name)
}

/// Runs `setup --sink rabbitmq`: declares the exchange and the dead-letter queue.
fn setup(db: &TestDb, url: &str, exchange: &str) -> String {
    let output = db
        .command("setup")
        .args(sink_args(url, exchange))
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    stdout_of_success(&output, "setup --sink rabbitmq")
}

/// Among first deliveries, each key's events arrive in commit order; returns how many
/// messages were duplicates.
fn assert_first_deliveries_in_commit_order(messages: &[Message]) -> usize {
    let mut seen = HashSet::new();
    let mut by_key: HashMap<String, Vec<(Lsn, u32)>> = HashMap::new();
    let mut duplicates = 0;
    for message in messages {
        if !seen.insert(message.id()) {
            duplicates += 1;
            continue;
        }
        let key = message.header("aggregate_id").unwrap_or_default();
        by_key
            .entry(key)
            .or_default()
            .push(source_position(|name| message.header(name)));
    }
    for (key, positions) in by_key {
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "key {key}: first deliveries out of commit order: {positions:?}"
        );
    }
    duplicates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_rabbitmq_confirmed_with_their_properties_and_unroutable_ones_are_dead_lettered() {
    let url = rabbitmq::shared_url();
    let db = TestDb::new("rmq_basic").await;
    let exchange = db.name.clone();
    let said = setup(&db, &url, &exchange);
    assert!(
        said.contains(&format!("exchange {exchange} (durable, topic)")),
        "{said}"
    );
    let mut orders = Queue::bind(&url, &exchange, &format!("{}.orders", db.name), &db.topic("order")).await;

    // Three keys, two events per transaction, one transaction rolled back, one event whose
    // routing key no queue is bound to.
    let mut committed = Vec::new();
    for n in 0..10 {
        let transaction = db.client.simple_query("BEGIN").await;
        assert!(transaction.is_ok());
        for key in ["a", "b"] {
            committed.push(
                db.insert_event("order", &format!("{key}{}", n % 3), &format!(r#"{{"n": {n}}}"#))
                    .await,
            );
        }
        db.client.simple_query("COMMIT").await.unwrap_or_else(|e| panic!("{e}"));
    }
    db.client.simple_query("BEGIN").await.unwrap_or_else(|e| panic!("{e}"));
    db.insert_event("order", "a0", r#"{"phantom": true}"#).await;
    db.client
        .simple_query("ROLLBACK")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let unroutable = db.insert_event("nobody", "x", r#"{"lost": false}"#).await;

    let dlq = dead_letters(&db);
    let mut args = sink_args(&url, &exchange).to_vec();
    args.extend(["--dead-letter-topic", &dlq]);
    let mut relay = db.relay_with(&args);
    orders
        .read_until(Duration::from_secs(60), "20 events", |m| m.len() >= 20)
        .await;
    orders.read_quiet(Duration::from_millis(500)).await;
    let ids: Vec<String> = orders.messages.iter().map(Message::id).collect();
    assert_eq!(
        ids, committed,
        "every committed event once, in commit order, no phantom"
    );
    let first = &orders.messages[0];
    assert_eq!(first.routing_key, db.topic("order"));
    assert_eq!(first.kind.as_deref(), Some("Tested"));
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.delivery_mode, Some(2), "persistent");
    assert_eq!(first.json()["n"], 0);
    assert_eq!(first.header("aggregate_id").as_deref(), Some("a0"));
    assert_eq!(first.header("event_type").as_deref(), Some("Tested"));
    assert!(first.header("outbox.commit_lsn").is_some());
    assert_first_deliveries_in_commit_order(&orders.messages);

    let mut dead = Queue::open(&url, &format!("{}.dlq", db.name)).await;
    dead.read_until(Duration::from_secs(30), "the unroutable event's dead letter", |m| {
        !m.is_empty()
    })
    .await;
    let letter = &dead.messages[0];
    assert_eq!(letter.header("id").as_deref(), Some(unroutable.as_str()));
    let error = letter.header("outbox.error").unwrap_or_default();
    assert!(error.contains("unroutable"), "{error}");
    assert_eq!(letter.header("outbox.original_topic"), Some(db.topic("nobody")));
    assert_eq!(letter.json()["lost"], false, "the dead letter keeps the payload");

    db.wait_all_confirmed().await;
    let metrics = relay.get("/metrics").1;
    assert!(
        metrics.contains("outbox_relay_events_published_total{sink=\"rabbitmq\"} 20"),
        "{metrics}"
    );
    assert!(metrics.contains("outbox_relay_events_dead_lettered_total{sink=\"rabbitmq\"} 1"));
    eventually(Duration::from_secs(30), "ready", || async {
        (relay.get("/readyz").0 == 200).then_some(())
    })
    .await;

    let output = db
        .command("check")
        .args(sink_args(&url, &exchange))
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let report = stdout_of_success(&output, "check --sink rabbitmq");
    assert!(
        report.contains("[ok  ] RabbitMQ reachable at amqp://guest@127.0.0.1:"),
        "{report}"
    );
    assert!(
        !report.contains("guest:guest"),
        "no password in check's output: {report}"
    );
    assert!(
        report.contains(&format!("[ok  ] exchange {exchange} exists")),
        "{report}"
    );
    assert!(
        report.contains(&format!("[ok  ] dead-letter queue {}.dlq exists", db.name)),
        "{report}"
    );
    let output = db
        .command("check")
        .args(sink_args(&url, "no_such_exchange"))
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert!(
        report.contains("[FAIL] exchange no_such_exchange cannot be used"),
        "{report}"
    );

    assert_eq!(relay.terminate(Duration::from_secs(15)).code(), Some(0));
    orders.close().await;
    dead.close().await;
    db.drop().await;
}

/// RabbitMQ acknowledges many messages at once and lapin hands a returned message to
/// whichever confirm it resolves next: among 200 events, each of the 20 unroutable ones
/// must be dead-lettered, and none of the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn among_many_events_exactly_the_unroutable_ones_are_dead_lettered() {
    let url = rabbitmq::shared_url();
    let db = TestDb::new("rmq_returns").await;
    let exchange = db.name.clone();
    setup(&db, &url, &exchange);
    rabbitmq::declare(&url, &exchange, &format!("{}.orders", db.name), &db.topic("order")).await;
    let (mut routable, mut unroutable) = (Vec::new(), HashSet::new());
    for _ in 0..4 {
        db.client.simple_query("BEGIN").await.unwrap_or_else(|e| panic!("{e}"));
        for n in 0..50 {
            if n % 10 == 3 {
                unroutable.insert(db.insert_event("nobody", &format!("k{n}"), "{}").await);
            } else {
                routable.push(db.insert_event("order", &format!("k{}", n % 5), "{}").await);
            }
        }
        db.client.simple_query("COMMIT").await.unwrap_or_else(|e| panic!("{e}"));
    }
    let dlq = dead_letters(&db);
    let mut args = sink_args(&url, &exchange).to_vec();
    args.extend(["--dead-letter-topic", &dlq]);
    let relay = db.relay_with(&args);
    db.wait_all_confirmed().await;
    let mut orders = Queue::open(&url, &format!("{}.orders", db.name)).await;
    orders
        .read_until(Duration::from_secs(60), "the routable events", |m| {
            m.len() >= routable.len()
        })
        .await;
    orders.read_quiet(Duration::from_millis(500)).await;
    let mut dead = Queue::open(&url, &dlq).await;
    dead.read_until(Duration::from_secs(60), "the dead letters", |m| {
        m.len() >= unroutable.len()
    })
    .await;
    dead.read_quiet(Duration::from_millis(500)).await;
    let delivered: Vec<String> = orders.messages.iter().map(Message::id).collect();
    assert_eq!(delivered, routable, "every routable event once, in commit order");
    let letters: Vec<String> = dead
        .messages
        .iter()
        .map(|m| m.header("id").unwrap_or_default())
        .collect();
    assert_eq!(
        letters.len(),
        unroutable.len(),
        "one dead letter per unroutable event: {letters:?}"
    );
    assert_eq!(
        letters.into_iter().collect::<HashSet<_>>(),
        unroutable,
        "exactly the unroutable events"
    );
    drop(relay);
    orders.close().await;
    dead.close().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_exchange_or_url_stops_the_relay_with_a_clear_message() {
    let url = rabbitmq::shared_url();
    // No event is needed: the relay checks the exchange before it streams.
    let db = TestDb::new("rmq_missing").await;
    let mut relay = db.relay_with(&sink_args(&url, "never_declared"));
    let status = relay.wait_exit(Duration::from_secs(60));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("exchange never_declared"), "{log}");
    assert!(log.contains("setup --sink rabbitmq"), "{log}");
    assert!(!log.contains("guest:guest"), "no password in the log");

    let output = db
        .command("run")
        .args(["--sink", "rabbitmq"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("AMQP_URL"));
    db.drop().await;
}

/// 50,000 events from 4 writers (one transaction in ten rolled back), 10 SIGKILLs of the
/// relay with messages unconfirmed, and one RabbitMQ restart (killed, not stopped) while
/// the relay runs: nothing missing, no phantom, commit order per key among first
/// deliveries; duplicates counted. While the broker is down the relay confirms nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_thousand_events_through_ten_sigkills_and_a_broker_restart_lose_nothing() {
    let mut node = devrig::RabbitMq::start().unwrap_or_else(|e| panic!("cannot start RabbitMQ: {e}"));
    let url = node.url();
    let db = TestDb::new("rmq_crash").await;
    let exchange = "outbox";
    setup(&db, &url, exchange);
    // Read only at the end: the queue (durable, persistent messages) holds them through the
    // broker's restart.
    rabbitmq::declare(&url, exchange, "everything", &db.topic("order")).await;
    let args = sink_args(&url, exchange);
    let start = |extra: &[&str]| -> Relay {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(extra);
        db.relay_with(&all)
    };
    let mut writers: Vec<_> = (0..4)
        .map(|w| tokio::spawn(write_mixed(db.url.clone(), w, 12_500)))
        .collect();
    let mut relay = start(&["--max-in-flight", "2000"]);
    let mut kills = 0;
    let mut restarted = false;
    while kills < 10 {
        // Every kill lands mid-stream: keep writing until the tenth.
        if writers.iter().all(|w| w.is_finished()) {
            writers.push(tokio::spawn(write_mixed(db.url.clone(), 4 + kills, 2_000)));
        }
        let before = relay.metric("outbox_relay_events_published_total");
        eventually(Duration::from_secs(120), "progress and events in flight", || async {
            let published = relay.metric("outbox_relay_events_published_total");
            let in_flight = relay.metric("outbox_relay_events_in_flight");
            (published >= before + 1_500.0 && in_flight > 0.0).then_some(())
        })
        .await;
        if kills == 5 && !restarted {
            // The broker dies under the relay; it must not confirm anything meanwhile.
            node.stop();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let held = relay.metric("outbox_relay_confirmed_lsn");
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert_eq!(
                relay.metric("outbox_relay_confirmed_lsn"),
                held,
                "confirmed LSN moved while RabbitMQ was down"
            );
            node.restart()
                .unwrap_or_else(|e| panic!("cannot restart RabbitMQ: {e}"));
            restarted = true;
            continue;
        }
        relay.kill_hard();
        kills += 1;
        relay = start(&["--max-in-flight", "2000"]);
    }
    let mut ids = HashSet::new();
    for writer in writers {
        ids.extend(writer.await.unwrap_or_else(|e| panic!("{e}")));
    }
    assert!(ids.len() >= 50_000);
    db.wait_all_confirmed().await;
    let mut queue = Queue::open(&url, "everything").await;
    // Counted as they come: recounting ~100,000 messages at each one is quadratic.
    let (mut distinct, mut counted) = (HashSet::new(), 0);
    queue
        .read_until(Duration::from_secs(240), "every committed event", |messages| {
            distinct.extend(messages[counted..].iter().map(Message::id));
            counted = messages.len();
            distinct.len() >= ids.len()
        })
        .await;
    // Anything still on its way (a duplicate, or an event that should not be there).
    queue.read_quiet(Duration::from_secs(1)).await;
    let received: HashSet<String> = queue.messages.iter().map(Message::id).collect();
    let missing = ids.iter().filter(|id| !received.contains(*id)).count();
    let phantoms = received.iter().filter(|id| !ids.contains(*id)).count();
    let duplicates = assert_first_deliveries_in_commit_order(&queue.messages);
    eprintln!(
        "rabbitmq crash loop: {} committed, {} messages, {missing} missing, {duplicates} duplicates, {kills} SIGKILLs, 1 broker restart",
        ids.len(),
        queue.messages.len()
    );
    if missing > 0 {
        let lost: Vec<&String> = ids.iter().filter(|id| !received.contains(*id)).take(10).collect();
        eprintln!("lost (up to 10): {lost:?}; relay log: {}", relay.log.display());
    }
    assert_eq!(missing, 0, "events were lost");
    assert_eq!(phantoms, 0, "rolled-back events were published");
    assert!(relay.is_running());
    drop(relay);
    queue.close().await;
    db.drop().await;
}
