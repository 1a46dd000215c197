//! Steady state: a writer inserts single-row transactions at a fixed rate for a while;
//! outbox-relay (or the polling baseline) publishes them; a consumer measures, per event,
//! the time from the commit (a `clock_timestamp()` taken inside the inserting transaction,
//! in the payload) to its arrival at the consumer. Also the PostgreSQL CPU time spent
//! meanwhile, writer included, and at rate 0 what an idle relay or poller costs the server.
//! Rate [`MAX_RATE`] (`max` on the command line): [`MAX_WRITERS`] connections insert as fast
//! as the database accepts, the highest steady load this machine can give.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::{poller, probe, rig};

/// The rate that means "as fast as the database accepts".
pub const MAX_RATE: u64 = u64::MAX;

/// Concurrent writer connections at [`MAX_RATE`]: enough to keep PostgreSQL busy on two
/// cores, each waiting for its own commit.
const MAX_WRITERS: usize = 4;

/// `0,1000,5000,max` into rates.
pub fn parse_rates(list: &str) -> Vec<u64> {
    list.split(',')
        .map(|r| {
            if r == "max" {
                MAX_RATE
            } else {
                r.parse().expect("--rates R,R,...,max")
            }
        })
        .collect()
}

fn rate_label(rate: u64) -> String {
    if rate == MAX_RATE {
        "max".to_owned()
    } else {
        rate.to_string()
    }
}

/// Which design publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publisher {
    /// Nothing publishes: the writer's own cost, to subtract from the others.
    WriterOnly,
    Relay,
    Poller,
    /// `pg_recvlogical` reading the slot to /dev/null: what log tailing itself costs the
    /// server at a steady rate, whoever tails (opt-in: `--publisher pgrecvlogical`).
    PgRecvlogical,
}

/// What one steady-state run measured.
pub struct Steady {
    pub publisher: Publisher,
    pub rate: u64,
    pub seconds: f64,
    pub events: u64,
    /// Commit to consumer, microseconds.
    pub latency: Histogram<u64>,
    /// The relay's own commit-to-ack p50 and p99, ms (upper bounds of its histogram's
    /// buckets): latency without the consumer's side of the broker.
    pub relay_ack: Option<(Option<f64>, Option<f64>)>,
    /// The relay process's CPU seconds, start-up included.
    pub relay_cpu: Option<f64>,
    /// The relay process's peak RSS, MiB.
    pub relay_rss: Option<f64>,
    /// PostgreSQL CPU seconds during the run.
    pub pg_cpu: Option<f64>,
}

impl Steady {
    pub fn markdown(&self) -> String {
        let ms = |q: f64| self.latency.value_at_quantile(q) as f64 / 1000.0;
        let (per_second, per_event) = match self.pg_cpu {
            Some(cpu) => (
                format!("{:.1}", cpu * 1000.0 / self.seconds),
                if self.events > 0 {
                    format!("{:.1}", cpu * 1e6 / self.events as f64)
                } else {
                    "-".to_owned()
                },
            ),
            None => ("n/a".to_owned(), "n/a".to_owned()),
        };
        let latency = if self.events > 0 && !self.latency.is_empty() {
            format!(
                "{:.1} | {:.1} | {:.1} | {:.1}",
                ms(0.5),
                ms(0.99),
                ms(0.999),
                self.latency.max() as f64 / 1000.0
            )
        } else {
            "- | - | - | -".to_owned()
        };
        let bound = |ms: Option<f64>| ms.map_or_else(|| "-".to_owned(), |ms| format!("<= {ms:.0}"));
        let relay_ack = self.relay_ack.map_or_else(
            || "- | -".to_owned(),
            |(p50, p99)| format!("{} | {}", bound(p50), bound(p99)),
        );
        let relay_cpu = match self.relay_cpu {
            Some(cpu) if self.events > 0 => format!("{:.1}", cpu * 1e6 / self.events as f64),
            _ => "-".to_owned(),
        };
        let relay_rss = self.relay_rss.map_or_else(|| "-".to_owned(), |mib| format!("{mib:.1}"));
        format!(
            "| {:?} | {} | {:.0} | {} | {:.0} | {latency} | {relay_ack} | {relay_cpu} | {relay_rss} | {per_second} | {per_event} |",
            self.publisher,
            rate_label(self.rate),
            self.seconds,
            self.events,
            self.events as f64 / self.seconds
        )
    }
}

pub const HEADER: &str = "| publisher | target events/s | seconds | events | events/s written | p50 ms | p99 ms | p99.9 ms | max ms | relay's commit-to-ack p50 ms | p99 ms | relay CPU us/event | relay peak RSS MiB | PostgreSQL CPU ms per s | PostgreSQL CPU us/event (writer included) |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

fn now_micros() -> u64 {
    u64::try_from(outbox_relay::clock::now_micros()).unwrap_or(0)
}

/// Reads `topic` from the beginning until `stop` is set and `expected` events have
/// arrived (or a minute after stop); records each event's commit-to-arrival latency.
pub fn consume(
    bootstrap: String,
    topic: String,
    expected: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    latency: Arc<Mutex<Histogram<u64>>>,
) -> u64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "outbox-bench-steady")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .set("fetch.min.bytes", "1")
        .set("log_level", "3")
        .create()
        .expect("consumer");
    let mut assigned = false;
    let mut received = 0u64;
    let mut stopped_at: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Acquire) {
            let since = *stopped_at.get_or_insert_with(Instant::now);
            if received >= expected.load(Ordering::Acquire) || since.elapsed() > Duration::from_secs(60) {
                return received;
            }
        }
        if !assigned {
            if let Ok(metadata) = consumer.fetch_metadata(Some(&topic), Duration::from_secs(1)) {
                if let Some(found) = metadata
                    .topics()
                    .first()
                    .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                {
                    let mut list = TopicPartitionList::new();
                    for partition in found.partitions() {
                        list.add_partition_offset(&topic, partition.id(), Offset::Beginning)
                            .expect("partition");
                    }
                    consumer.assign(&list).expect("assign");
                    assigned = true;
                }
            }
            if !assigned {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        }
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            let arrived = now_micros();
            let committed = message
                .payload()
                .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                .and_then(|v| v["t"].as_u64());
            if let Some(committed) = committed {
                let _ = latency
                    .lock()
                    .expect("histogram")
                    .record(arrived.saturating_sub(committed).max(1));
            }
            received += 1;
        }
    }
}

/// One steady-state run: `rate` single-row transactions per second for `seconds`.
pub async fn measure(
    publisher: Publisher,
    rate: u64,
    seconds: u64,
    admin_url: &str,
    bootstrap: &str,
    postmaster: Option<u32>,
) -> Steady {
    let run = std::process::id();
    let letter = match publisher {
        Publisher::WriterOnly => "w",
        Publisher::Relay => "r",
        Publisher::Poller => "p",
        Publisher::PgRecvlogical => "l",
    };
    let tag = format!("{letter}{rate}");
    let database = format!("steady_{run}_{tag}");
    let url = rig::fresh_database(admin_url, &database).await;
    let slot = format!("steady_{run}_{tag}");
    rig::setup(&url, &slot);
    let client = rig::connect(&url).await;
    let prefix = format!("steady{run}{tag}");
    let topic = format!("{prefix}.steady");
    let (stop_poller, poller_stopped) = tokio::sync::watch::channel(false);
    // The relay or pg_recvlogical, whichever reads the slot.
    let mut reader = None;
    let metrics_port = devrig::free_port().expect("a free port");
    let mut poller_task = None;
    match publisher {
        Publisher::Relay | Publisher::PgRecvlogical => {
            let child = if publisher == Publisher::Relay {
                Command::new(rig::relay_binary())
                    .arg("run")
                    .env("DATABASE_URL", &url)
                    .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
                    .env("OUTBOX_RELAY_SLOT", &slot)
                    .env("OUTBOX_RELAY_TOPIC_TEMPLATE", format!("{prefix}.{{aggregate_type}}"))
                    .env("OUTBOX_RELAY_LOG", "warn")
                    .env("OUTBOX_RELAY_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("relay")
            } else {
                Command::new(devrig::pg_bindir().expect("PostgreSQL bin dir").join("pg_recvlogical"))
                    .args(["-d", &url, "--slot", &slot, "--start", "-f", "/dev/null"])
                    .args(["-o", "proto_version=1", "-o", "publication_names=outbox_pub"])
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("pg_recvlogical")
            };
            reader = Some(child);
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
                assert!(Instant::now() < deadline, "{publisher:?} did not start streaming");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Publisher::WriterOnly => {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .expect("drop the unused slot");
        }
        Publisher::Poller => {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .expect("drop the unused slot");
            poller::prepare(&client).await;
            let poller_client = rig::connect(&url).await;
            poller_task = Some(tokio::spawn(poller::run(
                poller_client,
                bootstrap.to_owned(),
                prefix.clone(),
                poller_stopped,
            )));
        }
    }

    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let publishes = matches!(publisher, Publisher::Relay | Publisher::Poller);
    let stop = Arc::new(AtomicBool::new(false));
    let latency = Arc::new(Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram"),
    ));
    let consumer = publishes.then(|| {
        let (bootstrap, topic) = (bootstrap.to_owned(), topic.clone());
        let (expected, stop, latency) = (Arc::clone(&expected), Arc::clone(&stop), Arc::clone(&latency));
        std::thread::spawn(move || consume(bootstrap, topic, expected, stop, latency))
    });

    let pg_before = postmaster.map(probe::postgres_cpu);
    let started = Instant::now();
    let written = write(&url, rate, Duration::from_secs(seconds)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let pg_cpu = pg_before.map(|before| probe::postgres_cpu(postmaster.unwrap_or_default()) - before);
    expected.store(written, Ordering::Release);
    stop.store(true, Ordering::Release);
    let received = match consumer {
        Some(consumer) => tokio::task::spawn_blocking(move || consumer.join().expect("consumer"))
            .await
            .expect("consumer"),
        None => written,
    };
    if received < written {
        println!(
            "steady {publisher:?} {}/s: only {received} of {written} events arrived within a minute",
            rate_label(rate)
        );
    }
    let _ = stop_poller.send(true);
    if let Some(task) = poller_task {
        let _ = task.await;
    }
    let relay = reader.as_ref().filter(|_| publisher == Publisher::Relay);
    let relay_ack = relay.map(|_| probe::relay_ack_p50_p99_ms(metrics_port));
    let relay_cpu = relay.map(|r| probe::cpu_seconds(r.id()));
    let relay_rss = relay.map(|r| probe::peak_rss_mib(r.id()));
    if let Some(mut reader) = reader {
        devrig::kill(reader.id(), 15);
        let _ = reader.wait();
        let _ = client.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await;
    }
    drop(client);
    rig::drop_database(admin_url, &database).await;
    let latency = Arc::try_unwrap(latency)
        .map(|m| m.into_inner().expect("histogram"))
        .unwrap_or_else(|shared| shared.lock().expect("histogram").clone());
    let result = Steady {
        publisher,
        rate,
        seconds: elapsed,
        events: written,
        latency,
        relay_ack,
        relay_cpu,
        relay_rss,
        pg_cpu,
    };
    println!("{}", result.markdown());
    result
}

/// Inserts single-row transactions, each with its commit time in the payload, for
/// `duration`: at `rate` per second evenly spread in 10 ms ticks, or at [`MAX_RATE`] from
/// [`MAX_WRITERS`] connections as fast as they commit. Returns the events written.
async fn write(url: &str, rate: u64, duration: Duration) -> u64 {
    const INSERT: &str = "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
         VALUES ('steady', $1, 'Tick', jsonb_build_object('t', (extract(epoch from clock_timestamp()) * 1000000)::bigint))";
    let started = Instant::now();
    if rate == MAX_RATE {
        let mut writers = Vec::new();
        for writer in 0..MAX_WRITERS as u64 {
            let client = rig::connect(url).await;
            writers.push(tokio::spawn(async move {
                let insert = client.prepare(INSERT).await.expect("prepare");
                let mut written = 0u64;
                while started.elapsed() < duration {
                    let key = format!("k{}", (written * MAX_WRITERS as u64 + writer) % 1000);
                    client.execute(&insert, &[&key]).await.expect("insert");
                    written += 1;
                }
                written
            }));
        }
        let mut total = 0;
        for writer in writers {
            total += writer.await.expect("writer");
        }
        return total;
    }
    let client = rig::connect(url).await;
    let insert = client.prepare(INSERT).await.expect("prepare");
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut written = 0u64;
    while started.elapsed() < duration {
        ticker.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while written < due {
            let key = format!("k{}", written % 1000);
            client.execute(&insert, &[&key]).await.expect("insert");
            written += 1;
        }
    }
    written
}
