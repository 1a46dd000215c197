//! Backfill at cutover: N rows already in the table when the slot is created, published by
//! `outbox-relay setup --backfill true` (listing the rows in the slot's snapshot, then
//! publishing them through the relay loop). Compared with draining the same backlog from
//! the slot (the drain scenarios), since both publish the same records.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{drain, probe, rig};

/// What one backfill measured.
pub struct Row {
    pub events: u64,
    /// From start to exit: the slot, the list and every event acknowledged.
    pub secs: f64,
    /// Of which publishing (as setup reports it).
    pub publish_secs: f64,
    pub cpu: f64,
    pub rss: f64,
}

pub const HEADER: &str = "| rows in the table | setup --backfill, s (start to exit) | events/s | of which publishing, s | events/s publishing | relay CPU us/event | peak RSS MiB |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |";

impl Row {
    pub fn markdown(&self) -> String {
        let n = self.events as f64;
        format!(
            "| {} | {:.2} | {:.0} | {:.2} | {:.0} | {:.1} | {:.1} |",
            self.events,
            self.secs,
            n / self.secs,
            self.publish_secs,
            n / self.publish_secs,
            self.cpu * 1e6 / n,
            self.rss
        )
    }
}

/// Writes `events` rows (100-row transactions, as drain scenario b) with no slot to read
/// them, then backfills them.
pub async fn backfill(events: u64, admin_url: &str, bootstrap: &str) -> Row {
    let run = std::process::id();
    let database = format!("bench_{run}_backfill");
    let url = rig::fresh_database(admin_url, &database).await;
    let client = rig::connect(&url).await;
    // The shipped table and publication; the slot setup makes is not the backfill's.
    let scratch = format!("bench_scratch_{run}");
    rig::setup(&url, &scratch);
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&scratch])
        .await
        .expect("drop the scratch slot");
    drain::write_backlog(&client, drain::SCENARIOS[1], events).await;

    let slot = format!("bench_backfill_{run}");
    let started = Instant::now();
    let mut setup = Command::new(rig::relay_binary())
        .args(["setup", "--backfill", "true", "--slot", &slot])
        .env("DATABASE_URL", &url)
        .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        .env(
            "OUTBOX_RELAY_TOPIC_TEMPLATE",
            format!("bench{run}backfill.{{aggregate_type}}"),
        )
        .env("OUTBOX_RELAY_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("setup --backfill");
    // CPU and peak RSS are read from /proc while it runs: the last reading before exit.
    let (mut cpu, mut rss) = (0.0, 0.0);
    while setup.try_wait().expect("wait").is_none() {
        cpu = probe::cpu_seconds(setup.id()).max(cpu);
        rss = probe::peak_rss_mib(setup.id()).max(rss);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let output = setup.wait_with_output().expect("setup output");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "setup --backfill failed: {report}");
    assert!(
        report.contains(&format!("{events} published")),
        "every row published: {report}"
    );
    // "...; 12.3 s" ends the line that counts what was published.
    let publish_secs = report
        .lines()
        .find(|line| line.starts_with("backfilled"))
        .and_then(|line| line.rsplit("; ").next())
        .and_then(|tail| tail.trim_end_matches(" s").parse::<f64>().ok())
        .unwrap_or(secs);
    println!(
        "backfill: {events} rows in {secs:.2} s ({publish_secs:.2} s publishing), {rss:.0} MiB peak\n{}",
        report.trim_end()
    );
    drop(client);
    rig::drop_database(admin_url, &database).await;
    Row {
        events,
        secs,
        publish_secs,
        cpu,
        rss,
    }
}
