//! `outbox-bench`: measures outbox-relay, reports figures; asserts nothing.
//!
//! Backlog drain: two slots are created at the same position, N outbox events are written
//! in single-row transactions while nothing reads them, then outbox-relay drains one slot
//! (publishing to Kafka and confirming) and `pg_recvlogical` drains the other to
//! /dev/null: the cost of merely reading the slot, the ceiling for any log-tailing relay.
//!
//! Usage: outbox-bench [--events N]   (DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS honoured)

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let events: u64 = args
        .iter()
        .position(|a| a == "--events")
        .and_then(|i| args.get(i + 1))
        .map_or(100_000, |n| n.parse().expect("--events N"));

    let (admin_url, _postgres) = match std::env::var("DATABASE_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let pg = devrig::Postgres::start().expect("PostgreSQL");
            (pg.url("postgres"), Some(pg))
        }
    };
    let (bootstrap, _broker) = match std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
        Ok(servers) => (servers, None),
        Err(_) => {
            let broker = devrig::Broker::start().expect("tansu");
            (broker.bootstrap_servers(), Some(broker))
        }
    };
    let run = std::process::id();
    let database = format!("bench_{run}");
    connect(&admin_url)
        .await
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .await
        .expect("db");
    let url = match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{database}"),
        None => panic!("DATABASE_URL must name a database"),
    };
    let client = connect(&url).await;
    let relay_slot = "bench_relay";
    let reader_slot = "bench_recvlogical";
    let status = Command::new(relay_binary())
        .args(["setup", "--apply-sql", "--slot", relay_slot])
        .env("DATABASE_URL", &url)
        .stdout(Stdio::null())
        .status()
        .expect("setup");
    assert!(status.success());
    client
        .query_one(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&reader_slot],
        )
        .await
        .expect("second slot");

    let started = Instant::now();
    client
        .batch_execute(&format!(
            "DO $$ BEGIN FOR i IN 1..{events} LOOP
               INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
               VALUES ('bench', 'k' || (i % 1000), 'Bench', jsonb_build_object('i', i));
               COMMIT;
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
        "backlog: {events} single-row transactions written in {:.1} s, WAL up to {target}",
        started.elapsed().as_secs_f64()
    );

    // outbox-relay: publish to Kafka and confirm.
    let started = Instant::now();
    let mut relay = Command::new(relay_binary())
        .arg("run")
        .env("DATABASE_URL", &url)
        .env("KAFKA_BOOTSTRAP_SERVERS", &bootstrap)
        .env("OUTBOX_RELAY_SLOT", relay_slot)
        .env("OUTBOX_RELAY_TOPIC_TEMPLATE", format!("bench{run}.{{aggregate_type}}"))
        .env("OUTBOX_RELAY_LOG", "warn")
        .env("OUTBOX_RELAY_METRICS_ADDR", "127.0.0.1:0")
        .stdout(Stdio::null())
        .spawn()
        .expect("relay");
    while !reached(&client, relay_slot, &target).await {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relay_secs = started.elapsed().as_secs_f64();
    let relay_cpu = cpu_seconds(relay.id());
    let relay_rss = peak_rss_mib(relay.id());
    devrig::kill(relay.id(), 15);
    let _ = relay.wait();

    // pg_recvlogical: read the same backlog from the twin slot, discard it.
    let bindir = devrig::pg_bindir().expect("PostgreSQL bin dir");
    let started = Instant::now();
    let status = Command::new(bindir.join("pg_recvlogical"))
        .args([
            "-d",
            &url,
            "--slot",
            reader_slot,
            "--start",
            "-f",
            "/dev/null",
            "-o",
            "proto_version=1",
        ])
        .args(["-o", "publication_names=outbox_pub", "--no-loop", "-E", &target])
        .stderr(Stdio::null())
        .status()
        .expect("pg_recvlogical");
    let reader_secs = started.elapsed().as_secs_f64();
    assert!(status.success(), "pg_recvlogical failed");

    println!(
        "outbox-relay:   {events} events drained and confirmed in {relay_secs:.2} s = {:.0} events/s; CPU {:.2} s ({:.1} us/event); peak RSS {relay_rss:.1} MiB",
        events as f64 / relay_secs,
        relay_cpu,
        relay_cpu * 1e6 / events as f64
    );
    println!(
        "pg_recvlogical: {events} events read in {reader_secs:.2} s = {:.0} events/s",
        events as f64 / reader_secs
    );
    println!("ratio outbox-relay / pg_recvlogical: {:.2}", reader_secs / relay_secs);
    println!(
        "slot {relay_slot} confirmed at {}",
        confirmed(&client, relay_slot).await
    );
}
