//! Reading what the relay wrote, with a plain rdkafka consumer (no consumer group):
//! every partition of each topic, from the beginning.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| value.as_ref())
            .map(|value| String::from_utf8_lossy(value).into_owned())
    }

    pub fn id(&self) -> String {
        self.header("id").unwrap_or_default()
    }

    pub fn key_text(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }

    pub fn payload_json(&self) -> serde_json::Value {
        serde_json::from_slice(self.payload.as_deref().unwrap_or_default()).unwrap_or(serde_json::Value::Null)
    }
}

pub struct Consumer {
    inner: BaseConsumer,
    topics: Vec<String>,
    assigned: HashSet<String>,
    pub records: Vec<Record>,
}

impl Consumer {
    pub fn new(bootstrap_servers: &str, topics: &[String]) -> Consumer {
        let inner: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap_servers)
            .set("group.id", "outbox-relay-tests")
            .set("enable.auto.commit", "false")
            .set("allow.auto.create.topics", "false")
            .set("isolation.level", "read_committed")
            .create()
            .unwrap_or_else(|e| panic!("cannot create consumer: {e}"));
        Consumer {
            inner,
            topics: topics.to_vec(),
            assigned: HashSet::new(),
            records: Vec::new(),
        }
    }

    fn assign_new_topics(&mut self) {
        let mut list = TopicPartitionList::new();
        for topic in &self.topics {
            if self.assigned.contains(topic) {
                continue;
            }
            let Ok(metadata) = self.inner.fetch_metadata(Some(topic), Duration::from_secs(2)) else {
                continue;
            };
            let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
                continue;
            };
            if found.error().is_some() || found.partitions().is_empty() {
                continue;
            }
            for partition in found.partitions() {
                list.add_partition_offset(topic, partition.id(), Offset::Beginning)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            self.assigned.insert(topic.clone());
        }
        if list.count() > 0 {
            self.inner
                .incremental_assign(&list)
                .unwrap_or_else(|e| panic!("cannot assign: {e}"));
        }
    }

    /// Polls once (assigning topics that have appeared) and keeps what arrives.
    fn poll_once(&mut self, last_assign: &mut Instant) {
        if self.assigned.len() < self.topics.len() && last_assign.elapsed() > Duration::from_millis(250) {
            self.assign_new_topics();
            *last_assign = Instant::now();
        }
        let Some(Ok(message)) = self.inner.poll(Duration::from_millis(100)) else {
            return;
        };
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        self.records.push(Record {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        });
    }

    /// Reads until `done(records)` holds; panics after `timeout`. Runs on this worker
    /// thread without stalling the runtime (multi-thread runtime only).
    pub fn read_until(&mut self, timeout: Duration, what: &str, done: impl Fn(&[Record]) -> bool) {
        tokio::task::block_in_place(|| {
            let deadline = Instant::now() + timeout;
            let mut last_assign = Instant::now() - Duration::from_secs(1);
            while !done(&self.records) {
                if Instant::now() > deadline {
                    panic!(
                        "timed out after {timeout:?} waiting for {what}; have {} records",
                        self.records.len()
                    );
                }
                self.poll_once(&mut last_assign);
            }
        });
    }

    /// Keeps reading until nothing new has arrived for `quiet` (to count duplicates that
    /// may still be on their way once every expected record is in).
    pub fn read_until_quiet(&mut self, quiet: Duration) {
        tokio::task::block_in_place(|| {
            let mut last_assign = Instant::now() - Duration::from_secs(1);
            let mut last_record = Instant::now();
            while last_record.elapsed() < quiet {
                let before = self.records.len();
                self.poll_once(&mut last_assign);
                if self.records.len() > before {
                    last_record = Instant::now();
                }
            }
        });
    }
}
