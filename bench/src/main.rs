//! `outbox-bench`: measures outbox-relay, reports figures; asserts nothing.
//!
//! Backlog drain: two slots are created at the same position, N outbox events are written
//! while nothing reads them, then outbox-relay drains one slot (publishing to Kafka and
//! confirming) and `pg_recvlogical` drains the other to /dev/null: the cost of merely
//! reading the slot, the ceiling for any log-tailing relay. Then a polling relay (the
//! design of our seed documents, `poller`) publishes and deletes the same rows. Three shapes
//! of backlog: (a) single-row transactions, (b) 100-row transactions, (c) one transaction.
//! PostgreSQL's CPU time during each drain is measured when the server is the bench's own.
//!
//! Steady state (`steady`): single-row transactions at fixed rates (0, 1k, 5k events/s),
//! commit-to-consumer latency and PostgreSQL CPU, for outbox-relay and for the poller.
//!
//! Usage: outbox-bench [--events N] [--seconds S] [--quick] [--scenario a|b|c|steady]
//! [--publisher writeronly|relay|poller] [--rates 0,1000,5000] [--write FILE] (default 1,000,000 events and 60 s per rate; --quick: 100,000 and 10 s;
//! DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS honoured). Prints Markdown tables; --write also
//! saves them.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod poller;
mod steady;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

fn relay_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().expect("target dir").join("outbox-relay")
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

async fn confirmed(client: &Client, slot: &str) -> String {
    client
        .query_one(
            "SELECT coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot")
        .get(0)
}

async fn reached(client: &Client, slot: &str, target: &str) -> bool {
    client
        .query_one(
            "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &target],
        )
        .await
        .expect("slot")
        .get::<_, Option<bool>>(0)
        .unwrap_or(false)
}

/// The relay's own confirmed LSN (bytes), from its /metrics; 0 while it does not answer.
fn relay_confirmed(port: u16) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = write!(stream, "GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix("outbox_relay_confirmed_lsn "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// CPU seconds used by the PostgreSQL server so far: the postmaster, every live child
/// (backends, walsenders, background workers) and every child already exited and reaped
/// (the postmaster's cutime/cstime), so short-lived backends count too.
fn postgres_cpu(postmaster: u32) -> f64 {
    let fields = |pid: &str| -> Vec<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let ticks = |f: &[String], range: std::ops::Range<usize>| -> f64 {
        f.get(range)
            .map_or(0.0, |v| v.iter().filter_map(|t| t.parse::<f64>().ok()).sum())
    };
    let own = fields(&postmaster.to_string());
    let mut total = ticks(&own, 11..15);
    let parent = postmaster.to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let f = fields(&name);
        if f.get(1) == Some(&parent) {
            total += ticks(&f, 11..13);
        }
    }
    total / 100.0
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .map_or(0.0, |f| f.iter().filter_map(|t| t.parse::<f64>().ok()).sum());
    ticks / 100.0
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// One backlog shape.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    name: &'static str,
    /// Events per transaction; `None`: all in one.
    per_transaction: Option<u64>,
}

const SCENARIOS: [Scenario; 3] = [
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
struct Row {
    scenario: Scenario,
    events: u64,
    /// Until the relay's own confirmed LSN (every event acknowledged) reached the end.
    relay_secs: f64,
    /// Until the slot's confirmed_flush_lsn did (the next standby status update).
    slot_secs: f64,
    relay_cpu: f64,
    relay_rss: f64,
    reader_secs: f64,
    poller_secs: f64,
    /// PostgreSQL CPU seconds while each drained, when the server is ours to watch.
    pg_cpu: Option<[f64; 3]>,
}

impl Row {
    fn markdown(&self) -> String {
        let n = self.events as f64;
        format!(
            "| {} | {} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.1} | {:.1} | {} |",
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
            self.relay_cpu * 1e6 / n,
            self.relay_rss,
            self.pg_cpu.map_or_else(
                || "n/a".to_owned(),
                |[relay, reader, poller]| format!(
                    "{:.1} / {:.1} / {:.1}",
                    relay * 1e6 / n,
                    reader * 1e6 / n,
                    poller * 1e6 / n
                )
            ),
        )
    }
}

const HEADER: &str = "| backlog | events | outbox-relay: all acked, s | events/s | slot confirmed, s | pg_recvlogical s | events/s | relay / pg_recvlogical | poller s | events/s | relay / poller | relay CPU us/event | relay peak RSS MiB | PostgreSQL CPU us/event: relay / pg_recvlogical / poller |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let events: u64 = arg(&args, "--events").map_or(if quick { 100_000 } else { 1_000_000 }, |n| {
        n.parse().expect("--events N")
    });
    let only = arg(&args, "--scenario");
    let write = arg(&args, "--write");

    let (admin_url, postgres) = match std::env::var("DATABASE_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let pg = devrig::Postgres::start().expect("PostgreSQL");
            (pg.url("postgres"), Some(pg))
        }
    };
    let postmaster = postgres.as_ref().and_then(devrig::Postgres::pid);
    let (bootstrap, _broker) = match std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
        Ok(servers) => (servers, None),
        Err(_) => {
            let broker = devrig::Broker::start().expect("tansu");
            (broker.bootstrap_servers(), Some(broker))
        }
    };
    let seconds: u64 = arg(&args, "--seconds").map_or(if quick { 10 } else { 60 }, |n| n.parse().expect("--seconds S"));
    let mut rows = Vec::new();
    for scenario in SCENARIOS {
        if only.as_deref().is_some_and(|o| !scenario.name.starts_with(o)) {
            continue;
        }
        rows.push(drain(scenario, events, &admin_url, &bootstrap, postmaster).await);
    }
    let mut steady_rows = Vec::new();
    if only.as_deref().is_none_or(|o| o == "steady") {
        let publishers = [
            steady::Publisher::WriterOnly,
            steady::Publisher::Relay,
            steady::Publisher::Poller,
        ];
        let wanted = arg(&args, "--publisher");
        let rates: Vec<u64> = arg(&args, "--rates").map_or(vec![0, 1_000, 5_000], |list| {
            list.split(',').map(|r| r.parse().expect("--rates R,R,...")).collect()
        });
        for publisher in publishers {
            if wanted
                .as_deref()
                .is_some_and(|w| !format!("{publisher:?}").eq_ignore_ascii_case(w))
            {
                continue;
            }
            for &rate in &rates {
                steady_rows.push(steady_state(publisher, rate, seconds, &admin_url, &bootstrap, postmaster).await);
            }
        }
    }
    let mut table = String::new();
    if !rows.is_empty() {
        table.push_str(&format!("Backlog drain:\n\n{HEADER}\n"));
        for row in &rows {
            table.push_str(&row.markdown());
            table.push('\n');
        }
    }
    if !steady_rows.is_empty() {
        table.push_str(&format!(
            "\nSteady state, single-row transactions:\n\n{}\n",
            steady::HEADER
        ));
        for row in &steady_rows {
            table.push_str(&row.markdown());
            table.push('\n');
        }
    }
    println!("\n{table}");
    if let Some(path) = write {
        let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
        let text = format!(
            "Written by `scripts/bench {command}` on {} ({} CPUs).\n\n{table}",
            machine(),
            std::thread::available_parallelism().map_or(0, usize::from)
        );
        std::fs::write(&path, text).expect("write the table");
        println!("written to {path}");
    }
}

/// The CPU model, for the record.
fn machine() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
        .map_or_else(|| "unknown CPU".to_owned(), |m| m.trim().to_owned())
}

/// Writes the backlog for `scenario` into a fresh database with two slots, then drains it
/// with outbox-relay and with pg_recvlogical.
async fn drain(scenario: Scenario, events: u64, admin_url: &str, bootstrap: &str, postmaster: Option<u32>) -> Row {
    // Read until two readings 50 ms apart agree, so a backend that just exited has been
    // reaped into the postmaster's children times rather than missed between the reads.
    let pg_cpu = || async move {
        let Some(pid) = postmaster else { return 0.0 };
        let mut last = postgres_cpu(pid);
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = postgres_cpu(pid);
            if (now - last).abs() < 1e-9 {
                break;
            }
            last = now;
        }
        last
    };
    let run = std::process::id();
    let tag = scenario.name.chars().next().unwrap_or('x');
    let database = format!("bench_{run}_{tag}");
    let url = fresh_database(admin_url, &database).await;
    let mut client = connect(&url).await;
    let relay_slot = format!("bench_relay_{run}_{tag}");
    let reader_slot = format!("bench_recvlogical_{run}_{tag}");
    setup(&url, &relay_slot);
    client
        .query_one(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&reader_slot],
        )
        .await
        .expect("second slot");
    poller::prepare(&client).await;

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

    // outbox-relay: publish to Kafka and confirm.
    let port = devrig::free_port().expect("a free port");
    let pg_before = pg_cpu().await;
    let started = Instant::now();
    let mut relay = Command::new(relay_binary())
        .arg("run")
        .env("DATABASE_URL", &url)
        .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        .env("OUTBOX_RELAY_SLOT", &relay_slot)
        .env(
            "OUTBOX_RELAY_TOPIC_TEMPLATE",
            format!("bench{run}{tag}.{{aggregate_type}}"),
        )
        .env("OUTBOX_RELAY_LOG", "warn")
        .env("OUTBOX_RELAY_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .spawn()
        .expect("relay");
    let end = target.parse::<outbox_relay::lsn::Lsn>().expect("an LSN").0;
    while relay_confirmed(port) < end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let relay_secs = started.elapsed().as_secs_f64();
    while !reached(&client, &relay_slot, &target).await {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let slot_secs = started.elapsed().as_secs_f64();
    let pg_relay = pg_cpu().await - pg_before;
    let relay_cpu = cpu_seconds(relay.id());
    let relay_rss = peak_rss_mib(relay.id());
    devrig::kill(relay.id(), 15);
    let _ = relay.wait();

    // pg_recvlogical: read the same backlog from the twin slot, discard it.
    let bindir = devrig::pg_bindir().expect("PostgreSQL bin dir");
    let pg_before = pg_cpu().await;
    let started = Instant::now();
    let status = Command::new(bindir.join("pg_recvlogical"))
        .args(["-d", &url, "--slot", &reader_slot, "--start", "-f", "/dev/null"])
        .args(["-o", "proto_version=1", "-o", "publication_names=outbox_pub"])
        .args(["--no-loop", "-E", &target])
        .stderr(Stdio::null())
        .status()
        .expect("pg_recvlogical");
    let reader_secs = started.elapsed().as_secs_f64();
    let pg_reader = pg_cpu().await - pg_before;
    assert!(status.success(), "pg_recvlogical failed");
    println!(
        "{}: outbox-relay {relay_secs:.2} s (confirmed at {}), pg_recvlogical {reader_secs:.2} s",
        scenario.name,
        confirmed(&client, &relay_slot).await
    );
    // The polling baseline: the same rows, published and deleted in batches.
    let pg_before = pg_cpu().await;
    let run_tag = format!("poll{run}{tag}");
    let (polled, poller_secs) = poller::drain(&mut client, bootstrap, &run_tag).await;
    let pg_poller = pg_cpu().await - pg_before;
    assert_eq!(polled, events, "the poller published every row");
    println!("{}: poller {poller_secs:.2} s", scenario.name);

    for slot in [&relay_slot, &reader_slot] {
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
            .expect("drop slot");
    }
    drop(client);
    connect(admin_url)
        .await
        .batch_execute(&format!("DROP DATABASE {database}"))
        .await
        .expect("drop db");
    Row {
        scenario,
        events,
        relay_secs,
        slot_secs,
        relay_cpu,
        relay_rss,
        reader_secs,
        poller_secs,
        pg_cpu: postmaster.map(|_| [pg_relay, pg_reader, pg_poller]),
    }
}

/// Creates an empty database; returns its URL.
async fn fresh_database(admin_url: &str, name: &str) -> String {
    connect(admin_url)
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("db");
    match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("DATABASE_URL must name a database"),
    }
}

/// `outbox-relay setup --apply-sql`: the outbox table, the publication and `slot`.
fn setup(url: &str, slot: &str) {
    let status = Command::new(relay_binary())
        .args(["setup", "--apply-sql", "--slot", slot])
        .env("DATABASE_URL", url)
        .stdout(Stdio::null())
        .status()
        .expect("setup");
    assert!(status.success(), "outbox-relay setup failed");
}

/// One steady-state run: `rate` single-row transactions per second for `seconds`.
async fn steady_state(
    publisher: steady::Publisher,
    rate: u64,
    seconds: u64,
    admin_url: &str,
    bootstrap: &str,
    postmaster: Option<u32>,
) -> steady::Steady {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    let run = std::process::id();
    let letter = match publisher {
        steady::Publisher::WriterOnly => "w",
        steady::Publisher::Relay => "r",
        steady::Publisher::Poller => "p",
    };
    let tag = format!("{letter}{rate}");
    let database = format!("steady_{run}_{tag}");
    let url = fresh_database(admin_url, &database).await;
    let slot = format!("steady_{run}_{tag}");
    setup(&url, &slot);
    let client = connect(&url).await;
    let prefix = format!("steady{run}{tag}");
    let topic = format!("{prefix}.steady");
    let (stop_poller, poller_stopped) = tokio::sync::watch::channel(false);
    let mut relay = None;
    let mut poller_task = None;
    match publisher {
        steady::Publisher::Relay => {
            relay = Some(
                Command::new(relay_binary())
                    .arg("run")
                    .env("DATABASE_URL", &url)
                    .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
                    .env("OUTBOX_RELAY_SLOT", &slot)
                    .env("OUTBOX_RELAY_TOPIC_TEMPLATE", format!("{prefix}.{{aggregate_type}}"))
                    .env("OUTBOX_RELAY_LOG", "warn")
                    .env("OUTBOX_RELAY_METRICS_ADDR", "127.0.0.1:0")
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("relay"),
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let active: bool = client
                    .query_one("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
                    .await
                    .expect("slot")
                    .get(0);
                if active {
                    break;
                }
                assert!(Instant::now() < deadline, "the relay did not start streaming");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        steady::Publisher::WriterOnly => {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .expect("drop the unused slot");
        }
        steady::Publisher::Poller => {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .expect("drop the unused slot");
            poller::prepare(&client).await;
            let poller_client = connect(&url).await;
            poller_task = Some(tokio::spawn(poller::run(
                poller_client,
                bootstrap.to_owned(),
                prefix.clone(),
                poller_stopped,
            )));
        }
    }

    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let publishes = publisher != steady::Publisher::WriterOnly;
    let stop = Arc::new(AtomicBool::new(false));
    let latency = Arc::new(Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram"),
    ));
    let consumer = publishes.then(|| {
        let (bootstrap, topic) = (bootstrap.to_owned(), topic.clone());
        let (expected, stop, latency) = (Arc::clone(&expected), Arc::clone(&stop), Arc::clone(&latency));
        std::thread::spawn(move || steady::consume(bootstrap, topic, expected, stop, latency))
    });

    // The writer: single-row transactions, evenly spread in 10 ms ticks.
    let writer = connect(&url).await;
    let insert = writer
        .prepare(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('steady', $1, 'Tick', jsonb_build_object('t', (extract(epoch from clock_timestamp()) * 1000000)::bigint))",
        )
        .await
        .expect("prepare");
    let pg_before = postmaster.map(postgres_cpu);
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut written = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        ticker.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while written < due {
            let key = format!("k{}", written % 1000);
            writer.execute(&insert, &[&key]).await.expect("insert");
            written += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let pg_cpu = pg_before.map(|before| postgres_cpu(postmaster.unwrap_or_default()) - before);
    expected.store(written, Ordering::Release);
    stop.store(true, Ordering::Release);
    let received = match consumer {
        Some(consumer) => tokio::task::spawn_blocking(move || consumer.join().expect("consumer"))
            .await
            .expect("consumer"),
        None => written,
    };
    if received < written {
        println!("steady {publisher:?} {rate}/s: only {received} of {written} events arrived within a minute");
    }
    let _ = stop_poller.send(true);
    if let Some(task) = poller_task {
        let _ = task.await;
    }
    if let Some(mut relay) = relay {
        devrig::kill(relay.id(), 15);
        let _ = relay.wait();
        let _ = client.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await;
    }
    drop(client);
    drop(writer);
    let _ = connect(admin_url)
        .await
        .batch_execute(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .await;
    let latency = Arc::try_unwrap(latency)
        .map(|m| m.into_inner().expect("histogram"))
        .unwrap_or_else(|shared| shared.lock().expect("histogram").clone());
    let result = steady::Steady {
        publisher,
        rate,
        seconds: elapsed,
        events: written,
        latency,
        pg_cpu,
    };
    println!("{}", result.markdown());
    result
}
