//! The broker alone: a plain rdkafka producer with the relay's settings sends records
//! shaped like the relay's (same key spread, payload size and headers) as fast as the
//! broker acknowledges them, with as many in flight as the relay allows. No PostgreSQL.
//! This is the ceiling the local broker puts on any publisher, and the CPU a bare
//! producer spends per record, to set against the relay's.

use std::collections::VecDeque;
use std::time::Instant;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::probe;

/// What producing to the broker alone measured.
#[derive(Debug, Clone, Copy)]
pub struct Baseline {
    pub events: u64,
    pub secs: f64,
    /// CPU of this process (the producer) per record, microseconds.
    pub producer_cpu_us: f64,
    /// CPU of the broker per record, microseconds, when the broker is the bench's own.
    pub broker_cpu_us: Option<f64>,
}

impl Baseline {
    pub fn markdown(&self) -> String {
        format!(
            "| {} | {:.2} | {:.0} | {:.1} | {} |",
            self.events,
            self.secs,
            self.events as f64 / self.secs,
            self.producer_cpu_us,
            self.broker_cpu_us
                .map_or_else(|| "n/a".to_owned(), |c| format!("{c:.1}")),
        )
    }
}

pub const HEADER: &str = "| records | seconds | records/s | producer CPU us/record | broker CPU us/record |
| --- | ---: | ---: | ---: | ---: |";

/// Records in flight at most: the relay's default `--max-in-flight`.
const WINDOW: usize = 10_000;

pub async fn produce(bootstrap: &str, topic: &str, events: u64, broker_pid: Option<u32>) -> Baseline {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("partitioner", "murmur2_random")
        .set("queue.buffering.max.kbytes", "65536")
        .set("message.timeout.ms", "0")
        .create()
        .expect("producer");
    let own = std::process::id();
    let (cpu_before, broker_before) = (probe::cpu_seconds(own), broker_pid.map(probe::cpu_seconds));
    let started = Instant::now();
    let mut in_flight = VecDeque::with_capacity(WINDOW);
    for i in 0..events {
        let key = format!("k{}", i % 1000);
        let payload = format!("{{\"i\": {i}}}");
        let id = format!("00000000-0000-4000-8000-{i:012}");
        let lsn = format!("0/{:X}", 0x1000_0000 + i * 200);
        let headers = OwnedHeaders::new_with_capacity(6)
            .insert(Header {
                key: "id",
                value: Some(&id),
            })
            .insert(Header {
                key: "event_type",
                value: Some("Bench"),
            })
            .insert(Header {
                key: "aggregate_type",
                value: Some("bench"),
            })
            .insert(Header {
                key: "outbox.commit_lsn",
                value: Some(&lsn),
            })
            .insert(Header {
                key: "outbox.tx_index",
                value: Some("0"),
            })
            .insert(Header {
                key: "outbox.source",
                value: Some("bench/broker"),
            });
        let record = FutureRecord::to(topic).key(&key).payload(&payload).headers(headers);
        let delivery = producer.send_result(record).map_err(|(e, _)| e).expect("enqueue");
        in_flight.push_back(delivery);
        if in_flight.len() >= WINDOW {
            if let Some(oldest) = in_flight.pop_front() {
                oldest
                    .await
                    .expect("delivery")
                    .map_err(|(e, _)| e)
                    .expect("acknowledged");
            }
        }
    }
    for delivery in in_flight {
        delivery
            .await
            .expect("delivery")
            .map_err(|(e, _)| e)
            .expect("acknowledged");
    }
    let secs = started.elapsed().as_secs_f64();
    let per = |cpu: f64| cpu * 1e6 / events as f64;
    Baseline {
        events,
        secs,
        producer_cpu_us: per(probe::cpu_seconds(own) - cpu_before),
        broker_cpu_us: broker_pid
            .zip(broker_before)
            .map(|(pid, before)| per(probe::cpu_seconds(pid) - before)),
    }
}
