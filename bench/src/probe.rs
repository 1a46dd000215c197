//! Measurements taken from outside a process: CPU time and peak RSS from /proc, the
//! relay's own confirmed LSN from its /metrics, the machine's CPU model.

use std::time::Duration;

/// The relay's /metrics text; empty while it does not answer.
fn relay_metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(stream, "GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

/// The relay's own confirmed LSN (bytes), from its /metrics; 0 while it does not answer.
pub fn relay_confirmed(port: u16) -> u64 {
    relay_metrics(port)
        .lines()
        .find_map(|l| l.strip_prefix("outbox_relay_confirmed_lsn "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The relay's own commit-to-ack p50 and p99 (ms), each the upper bound of the histogram
/// bucket that holds it, from one read of its /metrics: latency without the consumer's
/// side of the broker.
pub fn relay_ack_p50_p99_ms(port: u16) -> (Option<f64>, Option<f64>) {
    let text = relay_metrics(port);
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("outbox_relay_commit_to_ack_seconds_bucket{"))
        // Labels before `le` (the sink's) are skipped.
        .filter_map(|l| l.split_once("le=\"").map(|(_, rest)| rest))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            Some((
                le.parse::<f64>().unwrap_or(f64::INFINITY),
                count.split_whitespace().next()?.parse().ok()?,
            ))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |(_, count)| *count);
    let bound = |q: f64| {
        buckets
            .iter()
            .find(|(_, count)| total > 0.0 && *count >= q * total)
            .map(|(le, _)| le * 1000.0)
    };
    (bound(0.5), bound(0.99))
}

/// The fields of /proc/PID/stat after the command name.
fn stat_fields(pid: &str) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn tick_sum(fields: &[String], range: std::ops::Range<usize>) -> f64 {
    fields
        .get(range)
        .map_or(0.0, |v| v.iter().filter_map(|t| t.parse::<f64>().ok()).sum())
}

/// CPU seconds used by the PostgreSQL server so far: the postmaster, every live child
/// (backends, walsenders, background workers) and every child already exited and reaped
/// (the postmaster's cutime/cstime), so short-lived backends count too.
pub fn postgres_cpu(postmaster: u32) -> f64 {
    let own = stat_fields(&postmaster.to_string());
    let mut total = tick_sum(&own, 11..15);
    let parent = postmaster.to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let f = stat_fields(&name);
        if f.get(1) == Some(&parent) {
            total += tick_sum(&f, 11..13);
        }
    }
    total / 100.0
}

/// [`postgres_cpu`] once two readings 50 ms apart agree, so a backend that just exited has
/// been reaped into the postmaster's children times rather than missed between the reads.
/// 0 when the server is not the bench's own.
pub async fn settled_postgres_cpu(postmaster: Option<u32>) -> f64 {
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
}

/// CPU seconds (user + system, all threads) a process has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    tick_sum(&stat_fields(&pid.to_string()), 11..13) / 100.0
}

/// A live process's peak resident set, MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The CPU model, for the record.
pub fn machine() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
        .map_or_else(|| "unknown CPU".to_owned(), |m| m.trim().to_owned())
}
