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

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::sink::kafka::client_log::LogContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::Producer as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::errors::classify;
use super::partitioner::partition_for;
use super::producer::{Producer, ProducerSettings};
use crate::error::{Classify, ErrorClass};
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

impl Classify for FenceError {
    fn class(&self) -> ErrorClass {
        self.class
    }
}

/// What the broker says of a topic the fence has not seen: its partition count and,
/// per partition, the newest position this source wrote there.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TopicTail {
    pub partitions: i32,
    pub written: HashMap<i32, SourcePosition>,
}

/// A topic being read on its own thread; await it. Dropping it abandons the read, which
/// then ends on its own deadlines ([`METADATA_TIMEOUT`], [`READ_TIMEOUT`]).
pub type TopicRead = tokio::sync::oneshot::Receiver<Result<TopicTail, FenceError>>;

pub struct Fence {
    source: String,
    exactly_once: bool,
    producer: Producer,
    reader_settings: ProducerSettings,
    topics: HashMap<String, TopicId>,
    topic_state: Vec<TopicTail>,
}

impl Fence {
    /// `exactly_once = false` only picks partitions; nothing is read back or skipped.
    pub fn new(producer: Producer, settings: &ProducerSettings, source: String, exactly_once: bool) -> Self {
        Fence {
            source,
            exactly_once,
            producer,
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
    /// wrote `position` there; `None` for a topic not yet [`learned`](Self::learned).
    pub fn route(&self, topic: &str, key: &[u8], position: SourcePosition) -> Option<Route> {
        let id = *self.topics.get(topic)?;
        let state = &self.topic_state[id.0 as usize];
        let partition = partition_for(key, state.partitions);
        let already_written = state.written.get(&partition).is_some_and(|last| position <= *last);
        Some(Route {
            topic: id,
            partition,
            already_written,
        })
    }

    /// Starts reading `topic` from the broker on a thread of its own: librdkafka's metadata
    /// and consumer calls block, and the session loop must go on answering acknowledgements
    /// and the server's keepalives meanwhile.
    pub fn read_topic(&self, topic: &str) -> TopicRead {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let reading = TopicReading {
            topic: topic.to_owned(),
            source: self.source.clone(),
            exactly_once: self.exactly_once,
            producer: self.producer.clone(),
            settings: self.reader_settings.clone(),
        };
        let spawned = std::thread::Builder::new().name("fence-read".into()).spawn(move || {
            let _ = sender.send(reading.run());
        });
        if let Err(error) = spawned {
            // The receiver then reports a closed channel, a transient failure.
            tracing::error!(%error, "cannot start a thread to read a topic");
        }
        receiver
    }

    /// Remembers what [`read_topic`](Self::read_topic) found.
    pub fn learned(&mut self, topic: &str, tail: TopicTail) -> TopicId {
        if let Some(&id) = self.topics.get(topic) {
            return id;
        }
        if !tail.written.is_empty() {
            tracing::info!(
                topic,
                partitions = tail.written.len(),
                "exactly-once: resuming after records of an earlier run"
            );
        }
        let id = TopicId(self.topic_state.len() as u32);
        self.topic_state.push(tail);
        self.topics.insert(topic.to_owned(), id);
        id
    }

    /// Records that `position` is now in `partition` of `topic`.
    pub fn written(&mut self, topic: TopicId, partition: i32, position: SourcePosition) {
        if let Some(state) = self.topic_state.get_mut(topic.0 as usize) {
            raise(&mut state.written, partition, position);
        }
    }

    pub fn topic_name(&self, topic: TopicId) -> &str {
        self.topics
            .iter()
            .find(|(_, id)| **id == topic)
            .map_or("", |(name, _)| name.as_str())
    }
}

/// One topic's read, owned by its thread.
struct TopicReading {
    topic: String,
    source: String,
    exactly_once: bool,
    producer: Producer,
    settings: ProducerSettings,
}

impl TopicReading {
    fn run(self) -> Result<TopicTail, FenceError> {
        let partitions = self.partition_count()?;
        let written = if self.exactly_once {
            self.read_tails(partitions)?
        } else {
            HashMap::new()
        };
        Ok(TopicTail { partitions, written })
    }

    fn error(&self, class: ErrorClass, reason: String) -> FenceError {
        FenceError {
            topic: self.topic.clone(),
            class,
            reason,
        }
    }

    /// Asks the producer's client, which lets the broker create the topic if it allows.
    fn partition_count(&self) -> Result<i32, FenceError> {
        let topic = self.topic.as_str();
        let deadline = Instant::now() + METADATA_TIMEOUT;
        loop {
            let metadata = self
                .producer
                .inner()
                .client()
                .fetch_metadata(Some(topic), METADATA_TIMEOUT)
                .map_err(|e| self.error(classify(&e), format!("cannot read metadata: {e}")))?;
            if let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) {
                if let Some(code) = found.error() {
                    let kafka_error = KafkaError::MetadataFetch(code.into());
                    let class = classify(&kafka_error);
                    // A topic being created answers "unknown" or "leader not available" at first.
                    if class != ErrorClass::Transient && Instant::now() > deadline {
                        return Err(self.error(class, format!("{kafka_error}")));
                    }
                } else if !found.partitions().is_empty() {
                    return Ok(found.partitions().len() as i32);
                }
            }
            if Instant::now() > deadline {
                return Err(self.error(ErrorClass::Transient, "no partitions known yet".into()));
            }
            // This thread's own pause; the session loop runs on.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A consumer of this read's own: a new topic is rare, and a consumer shared between
    /// reads could hand one topic's buffered records or end-of-partition events to the
    /// next read, whose partitions share the numbers.
    fn new_reader(&self) -> Result<BaseConsumer<LogContext>, KafkaError> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.settings.bootstrap_servers);
        for (key, value) in &self.settings.properties {
            config.set(key, value);
        }
        config
            .set("group.id", "outbox-relay-fence")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("allow.auto.create.topics", "false")
            .set("isolation.level", "read_uncommitted")
            .set("log_level", "3");
        config.create_with_context(LogContext::default())
    }

    /// Reads the last records of every partition and returns, per partition, the newest
    /// position this source wrote there.
    fn read_tails(&self, partitions: i32) -> Result<HashMap<i32, SourcePosition>, FenceError> {
        let topic = self.topic.as_str();
        let error = |e: KafkaError| self.error(classify(&e), format!("cannot read the partitions' last records: {e}"));
        let reader = self.new_reader().map_err(error)?;
        let mut assignment = TopicPartitionList::new();
        // Partitions whose end-of-partition event has not come yet.
        let mut ends = HashSet::new();
        for partition in 0..partitions {
            let (low, high) = reader
                .fetch_watermarks(topic, partition, METADATA_TIMEOUT)
                .map_err(error)?;
            if high > low {
                let start = low.max(high - TAIL_RECORDS);
                assignment
                    .add_partition_offset(topic, partition, Offset::Offset(start))
                    .map_err(error)?;
                ends.insert(partition);
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
                return Err(self.error(
                    ErrorClass::Transient,
                    "timed out reading the partitions' last records".into(),
                ));
            }
            match reader.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    ends.remove(&partition);
                }
                Some(Err(e)) => return Err(error(e)),
                Some(Ok(message)) => {
                    let headers = message
                        .headers()
                        .into_iter()
                        .flat_map(|h| h.iter())
                        .map(|h| (h.key, h.value));
                    if let Some(position) = position_from(headers, &self.source) {
                        raise(&mut written, message.partition(), position);
                    }
                    // The end is the consumer's end-of-partition event, which follows the
                    // fetch's own high watermark, not the (possibly older) one above.
                }
            }
        }
        Ok(written)
    }
}

/// Keeps the newest position per partition.
fn raise(written: &mut HashMap<i32, SourcePosition>, partition: i32, position: SourcePosition) {
    let last = written.entry(partition).or_insert(position);
    if position > *last {
        *last = position;
    }
}

/// The source position of a record written by `source`, from its headers, if it is one.
fn position_from<'a>(
    headers: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
    source: &str,
) -> Option<SourcePosition> {
    let mut commit_lsn = None;
    let mut index = None;
    let mut ours = false;
    for (key, value) in headers {
        let value = value.and_then(|v| std::str::from_utf8(v).ok());
        match key {
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

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "app/outbox_relay";

    fn position(commit_lsn: u64, index: u32) -> SourcePosition {
        SourcePosition {
            commit_lsn: Lsn(commit_lsn),
            index,
        }
    }

    /// Whether key `k` of topic `orders` at `at` was written by an earlier run.
    fn already_written(fence: &Fence, at: SourcePosition) -> Option<bool> {
        fence.route("orders", b"k", at).map(|route| route.already_written)
    }

    /// A fence whose producer points nowhere: routing and bookkeeping never reach Kafka.
    fn fence(exactly_once: bool) -> Fence {
        let settings = ProducerSettings {
            bootstrap_servers: "127.0.0.1:9".into(),
            properties: Vec::new(),
        };
        let producer = Producer::new(&settings).unwrap_or_else(|e| panic!("{e}"));
        Fence::new(producer, &settings, SOURCE.into(), exactly_once)
    }

    #[test]
    fn a_record_is_ours_only_with_our_source_and_a_whole_position() {
        let headers = |source: &'static str| {
            vec![
                ("outbox.source", Some(source.as_bytes())),
                ("outbox.commit_lsn", Some(b"1/A0".as_slice())),
                ("outbox.tx_index", Some(b"3".as_slice())),
            ]
        };
        assert_eq!(
            position_from(headers(SOURCE).into_iter(), SOURCE),
            Some(position(0x1_0000_00A0, 3))
        );
        assert_eq!(position_from(headers("other/slot").into_iter(), SOURCE), None);
        let without_index = vec![
            ("outbox.source", Some(SOURCE.as_bytes())),
            ("outbox.commit_lsn", Some(b"1/A0".as_slice())),
        ];
        assert_eq!(position_from(without_index.into_iter(), SOURCE), None);
        let garbled = vec![
            ("outbox.source", Some(SOURCE.as_bytes())),
            ("outbox.commit_lsn", Some(b"not an lsn".as_slice())),
            ("outbox.tx_index", Some(b"3".as_slice())),
        ];
        assert_eq!(position_from(garbled.into_iter(), SOURCE), None);
    }

    #[test]
    fn an_unknown_topic_has_no_route_until_it_is_learned() {
        let mut fence = fence(true);
        assert_eq!(fence.route("orders", b"k", position(10, 0)), None);
        let mut written = HashMap::new();
        written.insert(0, position(100, 2));
        written.insert(1, position(100, 2));
        written.insert(2, position(100, 2));
        written.insert(3, position(100, 2));
        let id = fence.learned("orders", TopicTail { partitions: 4, written });
        assert_eq!(fence.topic_name(id), "orders");
        let route = fence
            .route("orders", b"k", position(10, 0))
            .unwrap_or_else(|| panic!("learned"));
        assert_eq!(route.partition, partition_for(b"k", 4));
        // At or before the partition's last written position: an earlier run wrote it.
        assert!(route.already_written);
        assert_eq!(already_written(&fence, position(100, 2)), Some(true));
        assert_eq!(already_written(&fence, position(100, 3)), Some(false));
        assert_eq!(already_written(&fence, position(101, 0)), Some(false));
        // Learning again keeps what is known.
        assert_eq!(fence.learned("orders", TopicTail::default()), id);
    }

    #[test]
    fn acknowledgements_raise_a_partitions_position_and_never_lower_it() {
        let mut fence = fence(true);
        let id = fence.learned(
            "orders",
            TopicTail {
                partitions: 1,
                written: HashMap::new(),
            },
        );
        assert_eq!(already_written(&fence, position(50, 0)), Some(false));
        fence.written(id, 0, position(50, 1));
        fence.written(id, 0, position(40, 0));
        assert_eq!(already_written(&fence, position(50, 1)), Some(true));
        assert_eq!(already_written(&fence, position(50, 2)), Some(false));
    }

    #[tokio::test]
    async fn a_broker_that_cannot_answer_is_a_transient_failure_of_the_read() {
        // Nothing listens on port 9: metadata never arrives, within the fence's bound.
        let fence = fence(false);
        let started = Instant::now();
        let outcome = fence
            .read_topic("orders")
            .await
            .unwrap_or_else(|_| panic!("the reading thread answers"));
        let error = outcome.err().unwrap_or_else(|| panic!("no broker, no partitions"));
        assert_eq!(error.class(), ErrorClass::Transient, "{error}");
        assert!(
            started.elapsed() < METADATA_TIMEOUT * 3,
            "bounded: {:?}",
            started.elapsed()
        );
    }
}
