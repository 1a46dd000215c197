//! Backlog drain: a fresh database gets a slot per reader at the same position, then N
//! outbox events are written while nothing reads. Then, one after the other on the same
//! backlog: outbox-relay drains its slot (publishing to Kafka and confirming);
//! `pg_recvlogical` reads its twin to /dev/null (the cost of merely reading the slot, the
//! ceiling for any log-tailing relay); Debezium's embedded engine drains a third slot into
//! a counting handler; the polling relay (`poller`) publishes and deletes the rows.
//! PostgreSQL's CPU time during each drain is measured when the server is the bench's own.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{debezium, poller, probe, rig};

/// One backlog shape.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    /// Events per transaction; `None`: all in one.
    pub per_transaction: Option<u64>,
}

pub const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "a: single-row transactions",
        per_transaction: Some(1),
    },
    Scenario {
        name: "b: 100-row transactions",
        per_transaction: Some(100),
    },
    Scenario {
        name: "c: one transaction",
        per_transaction: None,
    },
];

/// What one scenario measured.
pub struct Row {
    pub scenario: Scenario,
    pub events: u64,
    /// Until the relay's own confirmed LSN (every event acknowledged) reached the end.
    pub relay_secs: f64,
    /// Until the slot's confirmed_flush_lsn did (the next standby status update).
    pub slot_secs: f64,
    pub relay_cpu: f64,
    pub relay_rss: f64,
    pub reader_secs: f64,
    pub poller_secs: f64,
    /// When Debezium could be run.
    pub debezium: Option<debezium::Drained>,
    /// PostgreSQL CPU seconds while relay, pg_recvlogical and poller drained, when the
    /// server is ours to watch.
    pub pg_cpu: Option<[f64; 3]>,
}

pub const RATES_HEADER: &str = "| backlog | events | outbox-relay: all acked, s | events/s | slot confirmed, s | pg_recvlogical s | events/s | relay / pg_recvlogical | poller s | events/s | relay / poller | Debezium s (to last record) | events/s | relay / Debezium |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

pub const RESOURCES_HEADER: &str = "| backlog | relay CPU us/event | relay peak RSS MiB | PostgreSQL CPU us/event: relay / pg_recvlogical / poller | Debezium start-up s | Debezium CPU us/event | Debezium peak RSS MiB | Debezium slot confirmed at s (bytes short of the end) |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

impl Row {
    pub fn rates_markdown(&self) -> String {
        let n = self.events as f64;
        let debezium = self.debezium.map_or_else(
            || "n/a | n/a | n/a".to_owned(),
            |d| {
                format!(
                    "{:.2} | {:.0} | {:.2}",
                    d.drain_secs,
                    n / d.drain_secs,
                    d.drain_secs / self.relay_secs
                )
            },
        );
        format!(
            "| {} | {} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {debezium} |",
            self.scenario.name,
            self.events,
            self.relay_secs,
            n / self.relay_secs,
            self.slot_secs,
            self.reader_secs,
            n / self.reader_secs,
            self.reader_secs / self.relay_secs,
            self.poller_secs,
            n / self.poller_secs,
            self.poller_secs / self.relay_secs,
        )
    }

    pub fn resources_markdown(&self) -> String {
        let n = self.events as f64;
        let pg = self.pg_cpu.map_or_else(
            || "n/a".to_owned(),
            |[relay, reader, poller]| {
                format!(
                    "{:.1} / {:.1} / {:.1}",
                    relay * 1e6 / n,
                    reader * 1e6 / n,
                    poller * 1e6 / n
                )
            },
        );
        let debezium = self.debezium.map_or_else(
            || "n/a | n/a | n/a | n/a".to_owned(),
            |d| {
                format!(
                    "{:.2} | {:.1} | {:.0} | {:.2} ({})",
                    d.startup_secs,
                    d.cpu_secs * 1e6 / n,
                    d.peak_rss_mib,
                    d.confirm_secs,
                    d.confirm_behind
                )
            },
        );
        format!(
            "| {} | {:.1} | {:.1} | {pg} | {debezium} |",
            self.scenario.name,
            self.relay_cpu * 1e6 / n,
            self.relay_rss,
        )
    }
}

/// Writes `events` outbox rows in `scenario`'s transactions; returns the WAL position
/// after them.
pub async fn write_backlog(client: &tokio_postgres::Client, scenario: Scenario, events: u64) -> String {
    let started = Instant::now();
    let commit = match scenario.per_transaction {
        Some(size) => format!("IF i % {size} = 0 THEN COMMIT; END IF;"),
        None => String::new(),
    };
    client
        .batch_execute(&format!(
            "DO $$ BEGIN FOR i IN 1..{events} LOOP
               INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
               VALUES ('bench', 'k' || (i % 1000), 'Bench', jsonb_build_object('i', i));
               {commit}
             END LOOP; END $$"
        ))
        .await
        .expect("backlog");
    let target: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    println!(
        "{}: {events} events written in {:.1} s, WAL up to {target}",
        scenario.name,
        started.elapsed().as_secs_f64()
    );
    target
}

/// `pg_recvlogical` reads `slot` through `url` (libpq's URL, TLS settings included) up to
/// `target` into /dev/null; returns the seconds it took.
pub fn recvlogical_drain(url: &str, slot: &str, target: &str) -> f64 {
    let bindir = devrig::pg_bindir().expect("PostgreSQL bin dir");
    let started = Instant::now();
    let status = Command::new(bindir.join("pg_recvlogical"))
        .args(["-d", url, "--slot", slot, "--start", "-f", "/dev/null"])
        .args(["-o", "proto_version=1", "-o", "publication_names=outbox_pub"])
        .args(["--no-loop", "-E", target])
        .stderr(Stdio::null())
        .status()
        .expect("pg_recvlogical");
    assert!(status.success(), "pg_recvlogical failed");
    started.elapsed().as_secs_f64()
}

/// What one relay drain took.
pub struct RelayDrain {
    /// Until the relay's own confirmed LSN reached the end.
    pub secs: f64,
    /// Until the slot's confirmed_flush_lsn did.
    pub slot_secs: f64,
    pub cpu: f64,
    pub rss: f64,
}

/// Runs `outbox-relay run` on `slot` through `url` until it has confirmed `target`, then
/// stops it. Topics are `<topic_prefix>.<aggregate_type>`.
pub async fn relay_drain(
    url: &str,
    bootstrap: &str,
    slot: &str,
    topic_prefix: &str,
    target: &str,
    client: &tokio_postgres::Client,
) -> RelayDrain {
    relay_drain_to(url, bootstrap, slot, topic_prefix, target, client, &[]).await
}

/// As [`relay_drain`], with settings of another sink (`OUTBOX_RELAY_SINK`, ...) in `sink`.
pub async fn relay_drain_to(
    url: &str,
    bootstrap: &str,
    slot: &str,
    topic_prefix: &str,
    target: &str,
    client: &tokio_postgres::Client,
    sink: &[(&str, &str)],
) -> RelayDrain {
    let port = devrig::free_port().expect("a free port");
    let started = Instant::now();
    let mut relay = Command::new(rig::relay_binary())
        .arg("run")
        .env("DATABASE_URL", url)
        .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        .env("OUTBOX_RELAY_SLOT", slot)
        .env(
            "OUTBOX_RELAY_TOPIC_TEMPLATE",
            format!("{topic_prefix}.{{aggregate_type}}"),
        )
        .env("OUTBOX_RELAY_LOG", "warn")
        .env("OUTBOX_RELAY_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .envs(sink.iter().copied())
        .stdout(Stdio::null())
        .spawn()
        .expect("relay");
    let end = target.parse::<outbox_relay::lsn::Lsn>().expect("an LSN").0;
    while probe::relay_confirmed(port) < end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    while !rig::reached(client, slot, target).await {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let slot_secs = started.elapsed().as_secs_f64();
    let cpu = probe::cpu_seconds(relay.id());
    let rss = probe::peak_rss_mib(relay.id());
    devrig::kill(relay.id(), 15);
    let _ = relay.wait();
    RelayDrain {
        secs,
        slot_secs,
        cpu,
        rss,
    }
}

/// Writes the backlog for `scenario` into a fresh database, then drains it with each reader.
/// Debezium runs when `debezium_python` (see [`debezium::python`]) is given.
pub async fn drain(
    scenario: Scenario,
    events: u64,
    admin_url: &str,
    bootstrap: &str,
    postmaster: Option<u32>,
    debezium_python: Option<&Path>,
) -> Row {
    let run = std::process::id();
    let tag = scenario.name.chars().next().unwrap_or('x');
    let database = format!("bench_{run}_{tag}");
    let url = rig::fresh_database(admin_url, &database).await;
    let mut client = rig::connect(&url).await;
    let relay_slot = format!("bench_relay_{run}_{tag}");
    let reader_slot = format!("bench_recvlogical_{run}_{tag}");
    let debezium_slot = format!("bench_debezium_{run}_{tag}");
    rig::setup(&url, &relay_slot);
    let mut twins = vec![&reader_slot];
    if debezium_python.is_some() {
        twins.push(&debezium_slot);
    }
    for slot in &twins {
        client
            .query_one("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[slot])
            .await
            .expect("another slot");
    }
    poller::prepare(&client).await;

    let target = write_backlog(&client, scenario, events).await;

    // outbox-relay: publish to Kafka and confirm.
    let pg_before = probe::settled_postgres_cpu(postmaster).await;
    let relay = relay_drain(
        &url,
        bootstrap,
        &relay_slot,
        &format!("bench{run}{tag}"),
        &target,
        &client,
    )
    .await;
    let pg_relay = probe::settled_postgres_cpu(postmaster).await - pg_before;
    let (relay_secs, slot_secs, relay_cpu, relay_rss) = (relay.secs, relay.slot_secs, relay.cpu, relay.rss);

    // pg_recvlogical: read the same backlog from the twin slot, discard it.
    let pg_before = probe::settled_postgres_cpu(postmaster).await;
    let reader_secs = recvlogical_drain(&url, &reader_slot, &target);
    let pg_reader = probe::settled_postgres_cpu(postmaster).await - pg_before;
    println!(
        "{}: outbox-relay {relay_secs:.2} s (confirmed at {}), pg_recvlogical {reader_secs:.2} s",
        scenario.name,
        rig::confirmed(&client, &relay_slot).await
    );

    // Debezium: the third slot, into a handler that counts.
    let debezium = match debezium_python {
        Some(python) => {
            let drained = debezium::drain(python, &url, &debezium_slot, events, &client, &target).await;
            println!(
                "{}: Debezium {:.2} s (first record after {:.2} s), {:.0} MiB",
                scenario.name, drained.drain_secs, drained.startup_secs, drained.peak_rss_mib
            );
            Some(drained)
        }
        None => None,
    };

    // The polling baseline: the same rows, published and deleted in batches.
    let pg_before = probe::settled_postgres_cpu(postmaster).await;
    let run_tag = format!("poll{run}{tag}");
    let (polled, poller_secs) = poller::drain(&mut client, bootstrap, &run_tag).await;
    let pg_poller = probe::settled_postgres_cpu(postmaster).await - pg_before;
    assert_eq!(polled, events, "the poller published every row");
    println!("{}: poller {poller_secs:.2} s", scenario.name);

    drop(client);
    rig::drop_database(admin_url, &database).await;
    Row {
        scenario,
        events,
        relay_secs,
        slot_secs,
        relay_cpu,
        relay_rss,
        reader_secs,
        poller_secs,
        debezium,
        pg_cpu: postmaster.map(|_| [pg_relay, pg_reader, pg_poller]),
    }
}
