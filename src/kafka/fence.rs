//! Exactly-once publishing across crashes and restarts, without Kafka transactions.
//!
//! Every record the relay writes carries its source position (`outbox.commit_lsn`,
//! `outbox.tx_index`) and its source (`outbox.source`: database and slot). The relay picks
//! each record's partition itself ([`partition_for`]), so before it writes an event it knows
//! which partition's history to compare with. The first time a process routes to a topic,
//! it reads the tail of every partition of that topic and remembers, per partition, the
//! newest position this source wrote there. An event at or before that position was
//! written by an earlier run and is skipped; everything after it is published.
//!
//! Why this is enough: events reach a partition in commit order, and the idempotent
//! producer keeps that order through retries, so a partition's records from one source
//! form a prefix of that source's events for the partition. The slot replays from its
//! confirmed position, which is never after an unwritten event. See docs/adr/0002.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::kafka::client_log::LogContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::Producer as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::errors::{classify, ErrorClass};
use super::partitioner::partition_for;
use super::producer::{Producer, ProducerSettings};
use crate::lsn::Lsn;
use crate::outbox::{SourcePosition, HEADER_COMMIT_LSN, HEADER_SOURCE, HEADER_TX_INDEX};

/// How many records at the end of each partition are searched for this source's last one.
const TAIL_RECORDS: i64 = 256;
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a record goes, and whether an earlier run already wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub topic: TopicId,
    pub partition: i32,
    pub already_written: bool,
}

/// A topic known to the fence (cheap to keep in every in-flight tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TopicId(u32);

#[derive(Debug, thiserror::Error)]
#[error("topic {topic}: {reason}")]
pub struct FenceError {
    pub topic: String,
    pub class: ErrorClass,
    pub reason: String,
}

pub struct Fence {
    source: String,
    exactly_once: bool,
    producer: Producer,
    reader: Option<BaseConsumer<LogContext>>,
    reader_settings: ProducerSettings,
    topics: HashMap<String, TopicId>,
    topic_state: Vec<TopicState>,
}

struct TopicState {
    partitions: i32,
    /// Newest position this source has in each partition (read at first use, then raised
    /// by every acknowledgement).
    written: HashMap<i32, SourcePosition>,
}

impl Fence {
    /// `exactly_once = false` only picks partitions; nothing is read back or skipped.
    pub fn new(producer: Producer, settings: &ProducerSettings, source: String, exactly_once: bool) -> Self {
        Fence {
            source,
            exactly_once,
            producer,
            reader: None,
            reader_settings: settings.clone(),
            topics: HashMap::new(),
            topic_state: Vec::new(),
        }
    }

    /// The `outbox.source` header value of this relay's records.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Picks the partition for `key` in `topic` and says whether an earlier run already
    /// wrote `position` there. Blocks on Kafka the first time a topic is seen.
    pub fn route(&mut self, topic: &str, key: &[u8], position: SourcePosition) -> Result<Route, FenceError> {
        let id = match self.topics.get(topic) {
            Some(&id) => id,
            None => self.learn_topic(topic)?,
        };
        let state = &self.topic_state[id.0 as usize];
        let partition = partition_for(key, state.partitions);
        let already_written = state.written.get(&partition).is_some_and(|last| position <= *last);
        Ok(Route {
            topic: id,
            partition,
            already_written,
        })
    }

    /// Records that `position` is now in `partition` of `topic`.
    pub fn written(&mut self, topic: TopicId, partition: i32, position: SourcePosition) {
        if let Some(state) = self.topic_state.get_mut(topic.0 as usize) {
            let last = state.written.entry(partition).or_insert(position);
            if position > *last {
                *last = position;
            }
        }
    }

    pub fn topic_name(&self, topic: TopicId) -> &str {
        self.topics
            .iter()
            .find(|(_, id)| **id == topic)
            .map_or("", |(name, _)| name.as_str())
    }

    fn learn_topic(&mut self, topic: &str) -> Result<TopicId, FenceError> {
        let partitions = tokio::task::block_in_place(|| self.partition_count(topic))?;
        let written = if self.exactly_once {
            tokio::task::block_in_place(|| self.read_tails(topic, partitions))?
        } else {
            HashMap::new()
        };
        if !written.is_empty() {
            tracing::info!(
                topic,
                partitions = written.len(),
                "exactly-once: resuming after records of an earlier run"
            );
        }
        let id = TopicId(self.topic_state.len() as u32);
        self.topic_state.push(TopicState { partitions, written });
        self.topics.insert(topic.to_owned(), id);
        Ok(id)
    }

    /// Asks the producer's client, which lets the broker create the topic if it allows.
    fn partition_count(&self, topic: &str) -> Result<i32, FenceError> {
        let error = |class, reason: String| FenceError {
            topic: topic.to_owned(),
            class,
            reason,
        };
        let deadline = Instant::now() + METADATA_TIMEOUT;
        loop {
            let metadata = self
                .producer
                .inner()
                .client()
                .fetch_metadata(Some(topic), METADATA_TIMEOUT)
                .map_err(|e| error(classify(&e), format!("cannot read metadata: {e}")))?;
            if let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) {
                if let Some(code) = found.error() {
                    let kafka_error = KafkaError::MetadataFetch(code.into());
                    let class = classify(&kafka_error);
                    // A topic being created answers "unknown" or "leader not available" at first.
                    if class != ErrorClass::Transient && Instant::now() > deadline {
                        return Err(error(class, format!("{kafka_error}")));
                    }
                } else if !found.partitions().is_empty() {
                    return Ok(found.partitions().len() as i32);
                }
            }
            if Instant::now() > deadline {
                return Err(error(ErrorClass::Transient, "no partitions known yet".into()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn reader(&mut self) -> Result<&BaseConsumer<LogContext>, KafkaError> {
        if self.reader.is_none() {
            let mut config = ClientConfig::new();
            config.set("bootstrap.servers", &self.reader_settings.bootstrap_servers);
            for (key, value) in &self.reader_settings.properties {
                config.set(key, value);
            }
            config
                .set("group.id", "outbox-relay-fence")
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "true")
                .set("allow.auto.create.topics", "false")
                .set("isolation.level", "read_uncommitted")
                .set("log_level", "3");
            self.reader = Some(config.create_with_context(LogContext::default())?);
        }
        // Created just above if it was missing.
        self.reader.as_ref().ok_or(KafkaError::Canceled)
    }

    /// Reads the last records of every partition and returns, per partition, the newest
    /// position this source wrote there.
    fn read_tails(&mut self, topic: &str, partitions: i32) -> Result<HashMap<i32, SourcePosition>, FenceError> {
        let source = self.source.clone();
        let error = |e: KafkaError| FenceError {
            topic: topic.to_owned(),
            class: classify(&e),
            reason: format!("cannot read the partitions' last records: {e}"),
        };
        let reader = self.reader().map_err(error)?;
        let mut assignment = TopicPartitionList::new();
        let mut ends: HashMap<i32, i64> = HashMap::new();
        for partition in 0..partitions {
            let (low, high) = reader
                .fetch_watermarks(topic, partition, METADATA_TIMEOUT)
                .map_err(error)?;
            if high > low {
                let start = low.max(high - TAIL_RECORDS);
                assignment
                    .add_partition_offset(topic, partition, Offset::Offset(start))
                    .map_err(error)?;
                ends.insert(partition, high);
            }
        }
        let mut written = HashMap::new();
        if ends.is_empty() {
            return Ok(written);
        }
        reader.assign(&assignment).map_err(error)?;
        let deadline = Instant::now() + READ_TIMEOUT;
        while !ends.is_empty() {
            if Instant::now() > deadline {
                return Err(FenceError {
                    topic: topic.to_owned(),
                    class: ErrorClass::Transient,
                    reason: "timed out reading the partitions' last records".into(),
                });
            }
            match reader.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    ends.remove(&partition);
                }
                Some(Err(e)) => return Err(error(e)),
                Some(Ok(message)) => {
                    let partition = message.partition();
                    if let Some(position) = position_from(&message, &source) {
                        let last = written.entry(partition).or_insert(position);
                        if position > *last {
                            *last = position;
                        }
                    }
                    // The end is the consumer's end-of-partition event, which follows the
                    // fetch's own high watermark, not the (possibly older) one above.
                }
            }
        }
        reader.unassign().map_err(error)?;
        Ok(written)
    }
}

/// The source position of a record written by `source`, if it is one.
fn position_from(message: &rdkafka::message::BorrowedMessage<'_>, source: &str) -> Option<SourcePosition> {
    let headers = message.headers()?;
    let mut commit_lsn = None;
    let mut index = None;
    let mut ours = false;
    for header in headers.iter() {
        let value = header.value.and_then(|v| std::str::from_utf8(v).ok());
        match header.key {
            HEADER_SOURCE => ours = value == Some(source),
            HEADER_COMMIT_LSN => commit_lsn = value.and_then(|v| v.parse::<Lsn>().ok()),
            HEADER_TX_INDEX => index = value.and_then(|v| v.parse::<u32>().ok()),
            _ => {}
        }
    }
    match (ours, commit_lsn, index) {
        (true, Some(commit_lsn), Some(index)) => Some(SourcePosition { commit_lsn, index }),
        _ => None,
    }
}
