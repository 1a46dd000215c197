//! RabbitMQ (AMQP 0-9-1) behind the sink boundary.
//!
//! - One connection and one channel in confirm mode carry every event: RabbitMQ delivers
//!   a channel's messages to a queue in the order they were published, so events of one
//!   routing key reach their queues in commit order.
//! - Messages are persistent (`delivery_mode` 2) and published `mandatory`: a message no
//!   queue is bound for comes back (`basic.return`) before its confirm, and is poison
//!   (dead-lettered or the relay halts), never a silent drop.
//! - The publisher confirm is the acknowledgement `progress` waits for. A `basic.nack` or
//!   a lost connection fails every unconfirmed message as transient: the session ends and
//!   resumes from the confirmed position, publishing them again. Delivery is therefore
//!   at least once; `message_id` is the event id, for consumers to deduplicate.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use lapin::message::BasicReturnMessage;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ConnectionStatus, ExchangeKind};

use crate::check::Item;
use crate::error::{Classify, ErrorClass};
use crate::outbox::{OutboxEvent, HEADER_EVENT_TYPE};
use crate::sink::{Acked, Failure, Refusal, Returned, Sink, SinkError, Submitted, Tag};

/// The header that carries the event's key (the `aggregate_id` role's value).
pub const KEY_HEADER: &str = "aggregate_id";

/// How long connecting (TCP, TLS, AMQP handshake, channel) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the probe waits for a connection of its own.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// An AMQP URL whose password never reaches a log line: it is shown without it.
#[derive(Clone)]
pub struct AmqpUrl {
    uri: AMQPUri,
    shown: String,
}

impl AmqpUrl {
    /// Parses `amqp://user:password@host:port/vhost` (`amqps://` for TLS). The error
    /// never repeats the URL, which may hold a password.
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: AMQPUri = text
            .parse()
            .map_err(|_| "the AMQP URL is not of the form amqp[s]://user:password@host:port/vhost".to_owned())?;
        // lapin takes the vhost as an AMQP short string (and would panic on a longer one).
        if uri.vhost.len() > 255 {
            return Err("the vhost is longer than AMQP's 255 bytes".to_owned());
        }
        let vhost = if uri.vhost == "/" {
            "%2f".to_owned()
        } else {
            uri.vhost.clone()
        };
        let shown = format!(
            "{}://{}@{}:{}/{}",
            if matches!(uri.scheme, lapin::uri::AMQPScheme::AMQPS) {
                "amqps"
            } else {
                "amqp"
            },
            uri.authority.userinfo.username,
            uri.authority.host,
            uri.authority.port,
            vhost
        );
        Ok(AmqpUrl { uri, shown })
    }
}

impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// What the user said about RabbitMQ.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    pub url: AmqpUrl,
    /// The durable topic exchange events are published to (at most 255 bytes, as AMQP
    /// names are).
    pub exchange: ShortString,
}

impl AmqpSettings {
    /// Checks the URL and the exchange's name; the error names the setting.
    pub fn new(url: &str, exchange: &str) -> Result<Self, String> {
        let url = AmqpUrl::parse(url).map_err(|e| format!("--amqp-url: {e}"))?;
        let exchange =
            ShortString::try_new(exchange).map_err(|_| "--amqp-exchange: longer than AMQP's 255 bytes".to_owned())?;
        Ok(AmqpSettings { url, exchange })
    }
}

/// A lapin error with the relay's class.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AmqpError(#[from] lapin::Error);

impl Classify for AmqpError {
    fn class(&self) -> ErrorClass {
        classify(&self.0)
    }
}

/// Refusals that retrying cannot mend are fatal (credentials, rights, a missing exchange
/// or vhost); everything else (lost connection, broker restarting, timeouts) is transient.
fn classify(error: &lapin::Error) -> ErrorClass {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(
                AMQPSoftError::ACCESSREFUSED | AMQPSoftError::NOTFOUND | AMQPSoftError::PRECONDITIONFAILED,
            )
            | AMQPErrorKind::Hard(AMQPHardError::INVALIDPATH | AMQPHardError::NOTALLOWED) => ErrorClass::Fatal,
            _ => ErrorClass::Transient,
        },
        lapin::ErrorKind::InvalidProtocolVersion(_) | lapin::ErrorKind::AuthProviderError(_) => ErrorClass::Fatal,
        _ => ErrorClass::Transient,
    }
}

/// An open connection and its channel in confirm mode.
struct Link {
    connection: Connection,
    channel: Channel,
}

/// Opens a connection and a channel on it, bounded by [`CONNECT_TIMEOUT`].
async fn open(settings: &AmqpSettings) -> Result<(Connection, Channel), SinkError> {
    let context = || format!("RabbitMQ at {}", settings.url);
    let opening = async {
        let properties = ConnectionProperties::default().with_connection_name("outbox-relay".into());
        let connection = Connection::connect_uri(settings.url.uri.clone(), properties).await?;
        let channel = connection.create_channel().await?;
        Ok::<_, lapin::Error>((connection, channel))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, opening)
        .await
        .map_err(|_| SinkError::transient(context(), format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| SinkError::new(context(), AmqpError(e)))
}

/// Connects, checks that `exchange` exists, and opens a channel in confirm mode.
async fn connect(settings: &AmqpSettings) -> Result<Link, SinkError> {
    let (connection, channel) = open(settings).await?;
    exchange_exists(settings, &channel).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| SinkError::new(format!("RabbitMQ at {}", settings.url), AmqpError(e)))?;
    Ok(Link { connection, channel })
}

/// A passive declare: a missing exchange is said now, by name, not as a closed channel
/// later. A refusal closes `channel`.
async fn exchange_exists(settings: &AmqpSettings, channel: &Channel) -> Result<(), SinkError> {
    channel
        .exchange_declare(
            settings.exchange.clone(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            SinkError::new(
                format!(
                    "exchange {} on {} (create it with `outbox-relay setup --sink rabbitmq`)",
                    settings.exchange, settings.url
                ),
                AmqpError(e),
            )
        })
}

/// A message's confirm, with the tag of its event and its routing key.
type Pending = Pin<Box<dyn Future<Output = (Tag, ShortString, lapin::Result<Confirmation>)> + Send>>;

/// Which message a `basic.return` is for: its message id (the event id) and routing key.
type ReturnKey = (String, String);

pub struct RabbitSink {
    settings: AmqpSettings,
    link: Option<Link>,
    in_flight: FuturesUnordered<Pending>,
    /// Outcomes decided with others of the same broker acknowledgement, oldest first.
    decided: VecDeque<Acked>,
    /// Returned (unroutable) messages whose own confirm has not been seen yet. lapin hands
    /// a return to whichever confirm it resolves next, not to the message's own, so
    /// returns are matched to events by message id and routing key instead.
    returned: HashMap<ReturnKey, BasicReturnMessage>,
    /// The current connection's status, for the probe.
    status: Arc<Mutex<Option<ConnectionStatus>>>,
}

impl RabbitSink {
    pub fn new(settings: AmqpSettings) -> Self {
        RabbitSink {
            settings,
            link: None,
            in_flight: FuturesUnordered::new(),
            decided: VecDeque::new(),
            returned: HashMap::new(),
            status: Arc::default(),
        }
    }

    pub fn probe(&self) -> Probe {
        Probe {
            settings: self.settings.clone(),
            status: Arc::clone(&self.status),
        }
    }

    /// The channel, connecting first if there is none (or it broke).
    async fn channel(&mut self) -> Result<Channel, SinkError> {
        if let Some(link) = &self.link {
            if link.channel.status().connected() && link.connection.status().connected() {
                return Ok(link.channel.clone());
            }
            // A broken link is replaced only once its confirms are all in: a message of the
            // old channel must never be overtaken by one of the new.
            if !self.in_flight.is_empty() {
                return Err(SinkError::transient(
                    format!("RabbitMQ at {}", self.settings.url),
                    "the connection was lost with messages unconfirmed",
                ));
            }
        }
        let link = connect(&self.settings).await?;
        tracing::info!(url = %self.settings.url, exchange = %self.settings.exchange, "connected to RabbitMQ");
        if let Ok(mut status) = self.status.lock() {
            *status = Some(link.connection.status().clone());
        }
        let channel = link.channel.clone();
        self.link = Some(link);
        Ok(channel)
    }

    /// Connects (if not connected): for the check at start.
    pub async fn connect_now(&mut self) -> Result<(), SinkError> {
        self.channel().await.map(|_| ())
    }

    /// Forgets the link after a failure so that the next submit connects afresh.
    fn drop_link(&mut self) {
        self.link = None;
    }
}

/// The properties of `event`'s message: id, type, content type, headers, persistent.
fn properties(event: &OutboxEvent, tag: &Tag) -> Result<BasicProperties, Refusal> {
    let short = |what: &str, text: &str| {
        ShortString::try_new(text).map_err(|_| Refusal {
            class: ErrorClass::Poison,
            reason: format!("{what} is longer than AMQP's 255 bytes"),
            too_large: false,
        })
    };
    let mut headers = FieldTable::default();
    // The key travels as a header: queues have no keys, and consumers group by it.
    if let Some(key) = &event.key {
        headers.insert(KEY_HEADER.into(), AMQPValue::LongString(LongString::from(key.to_vec())));
    }
    for (name, value) in &event.headers {
        let value = match value {
            Some(bytes) => AMQPValue::LongString(LongString::from(bytes.to_vec())),
            None => AMQPValue::Void,
        };
        headers.insert(short("a header name", name)?, value);
    }
    let mut properties = BasicProperties::default()
        .with_message_id(short("the event id", &event.id)?)
        .with_delivery_mode(2)
        .with_app_id("outbox-relay".into())
        .with_timestamp((tag.txn.commit_time.max(0) / 1_000_000) as u64)
        .with_headers(headers);
    if let Some(Some(event_type)) = event.header(HEADER_EVENT_TYPE) {
        properties = properties.with_type(short("the event type", &String::from_utf8_lossy(event_type))?);
    }
    if let Some(content_type) = event.content_type {
        properties = properties.with_content_type(content_type.into());
    }
    Ok(properties)
}

impl Sink for RabbitSink {
    async fn submit(&mut self, event: &OutboxEvent, tag: Tag) -> Result<Submitted, SinkError> {
        let routing_key = match ShortString::try_new(event.topic.as_str()) {
            Ok(key) => key,
            Err(_) => {
                return Ok(Submitted::Refused(Refusal {
                    class: ErrorClass::Poison,
                    reason: format!("routing key {} is longer than AMQP's 255 bytes", event.topic),
                    too_large: false,
                }))
            }
        };
        let properties = match properties(event, &tag) {
            Ok(properties) => properties,
            Err(refusal) => return Ok(Submitted::Refused(refusal)),
        };
        let channel = self.channel().await?;
        let exchange = self.settings.exchange.clone();
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let payload = event.payload.as_deref().unwrap_or_default();
        let routing_key_copy = routing_key.clone();
        let confirm = match channel
            .basic_publish(exchange, routing_key, options, payload, properties)
            .await
        {
            Ok(confirm) => confirm,
            Err(error) => {
                self.drop_link();
                return Err(SinkError::new(
                    format!("RabbitMQ refused event id={}", event.id),
                    AmqpError(error),
                ));
            }
        };
        self.in_flight
            .push(Box::pin(async move { (tag, routing_key_copy, confirm.await) }));
        Ok(Submitted::Queued)
    }

    async fn next_ack(&mut self) -> Option<Acked> {
        if self.decided.is_empty() {
            let first = self.in_flight.next().await?;
            // Every confirm resolved with this one (one broker acknowledgement may cover
            // many): a message's return rides on whichever of them lapin resolved first,
            // always no later than the message's own confirm.
            let mut batch = vec![first];
            while let Some(Some(more)) = self.in_flight.next().now_or_never() {
                batch.push(more);
            }
            self.decide(batch);
        }
        let acked = self.decided.pop_front()?;
        if acked
            .result
            .as_ref()
            .is_err_and(|failure| failure.refusal.class == ErrorClass::Transient)
        {
            self.drop_link();
        }
        Some(acked)
    }

    fn in_flight(&self) -> usize {
        self.in_flight.len() + self.decided.len()
    }
}

impl RabbitSink {
    /// Turns resolved confirms into outcomes: their returns are pooled first, then each
    /// acknowledged message whose return is in the pool is poison.
    fn decide(&mut self, batch: Vec<(Tag, ShortString, lapin::Result<Confirmation>)>) {
        let mut confirms = Vec::with_capacity(batch.len());
        for (tag, routing_key, confirm) in batch {
            let confirm = confirm.map(|confirmation| match confirmation {
                Confirmation::Ack(message) => {
                    self.pool(message);
                    true
                }
                Confirmation::Nack(message) => {
                    self.pool(message);
                    false
                }
                Confirmation::NotRequested => false,
            });
            confirms.push((tag, routing_key, confirm));
        }
        for (tag, routing_key, confirm) in confirms {
            let key = (tag.id.clone(), routing_key.as_str().to_owned());
            let result = match confirm {
                Ok(true) => match self.returned.remove(&key) {
                    None => Ok(()),
                    Some(message) => Err(unroutable(&message)),
                },
                Ok(false) => Err(transient("RabbitMQ could not take the message (basic.nack)".into())),
                Err(error) => Err(transient(format!("no publisher confirm: {error}"))),
            };
            self.decided.push_back(Acked { tag, result });
        }
        if self.in_flight.is_empty() {
            // Nothing left for a stray return to belong to (a message of an earlier channel).
            self.returned.clear();
        }
    }

    fn pool(&mut self, message: Option<BasicReturnMessage>) {
        if let Some(message) = message {
            let id = message
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default();
            let key = (id, message.delivery.routing_key.as_str().to_owned());
            self.returned.insert(key, message);
        }
    }
}

fn transient(reason: String) -> Failure {
    Failure {
        refusal: Refusal {
            class: ErrorClass::Transient,
            reason,
            too_large: false,
        },
        returned: None,
    }
}

/// An event no queue is bound for: poison, with the message as the broker returned it.
fn unroutable(message: &BasicReturnMessage) -> Failure {
    let reason = format!(
        "unroutable: no queue is bound to routing key {} on exchange {} ({} {})",
        message.delivery.routing_key, message.delivery.exchange, message.reply_code, message.reply_text
    );
    Failure {
        refusal: Refusal {
            class: ErrorClass::Poison,
            reason,
            too_large: false,
        },
        returned: Some(Box::new(returned(&message.delivery))),
    }
}

/// A returned message in the relay's terms, for its dead letter.
fn returned(delivery: &lapin::message::Delivery) -> Returned {
    let headers = delivery
        .properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .map(|(name, value)| {
                    let value = match value {
                        AMQPValue::LongString(text) => Some(bytes::Bytes::copy_from_slice(text.as_bytes())),
                        _ => None,
                    };
                    (name.as_str().to_owned().into(), value)
                })
                .collect()
        })
        .unwrap_or_default();
    Returned {
        destination: Some(delivery.routing_key.as_str().to_owned()),
        key: None,
        payload: Some(bytes::Bytes::copy_from_slice(&delivery.data)),
        headers,
    }
}

/// Asks whether RabbitMQ answers: the relay's connection if it has a live one, else a
/// short connection of its own (so an idle relay notices the broker coming back).
#[derive(Clone)]
pub struct Probe {
    settings: AmqpSettings,
    status: Arc<Mutex<Option<ConnectionStatus>>>,
}

impl Probe {
    pub async fn answers(&self) -> bool {
        let live = self
            .status
            .lock()
            .ok()
            .and_then(|status| status.as_ref().map(ConnectionStatus::connected));
        if live == Some(true) {
            return true;
        }
        // Bounded like Kafka's probe: a stalled broker must not hold up the monitor.
        match tokio::time::timeout(PROBE_TIMEOUT, connect(&self.settings)).await {
            Ok(Ok(link)) => {
                let _ = link.connection.close(200, "probe".into()).await;
                true
            }
            _ => false,
        }
    }
}

/// Declares the durable topic exchange and a durable queue for dead letters bound to it
/// by the dead-letter routing key, so that dead letters are routable from the start.
/// Returns what was done, one line each.
pub async fn declare(settings: &AmqpSettings, dead_letter_key: &str) -> Result<Vec<String>, SinkError> {
    let (connection, channel) = open(settings).await?;
    let exchange = settings.exchange.clone();
    let queue = ShortString::try_new(dead_letter_key).map_err(|e| SinkError {
        context: format!("dead-letter queue {dead_letter_key:?}"),
        class: ErrorClass::Fatal,
        source: Box::new(e),
    })?;
    let declared = async {
        channel
            .exchange_declare(
                exchange.clone(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                queue.clone(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.clone(),
                exchange.clone(),
                queue.clone(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>(())
    };
    let result = declared.await;
    let _ = connection.close(200, "setup done".into()).await;
    result.map_err(|e| {
        SinkError::new(
            format!("declaring exchange {} on {}", settings.exchange, settings.url),
            AmqpError(e),
        )
    })?;
    Ok(vec![
        format!("exchange {} (durable, topic) on {}", settings.exchange, settings.url),
        format!("queue {dead_letter_key} (durable) bound to it by routing key {dead_letter_key}, for dead letters"),
    ])
}

/// `check`'s view: reachable, the exchange exists, dead letters have a queue.
pub async fn check(settings: &AmqpSettings, dead_letter_key: &str) -> Vec<Item> {
    let (connection, channel) = match open(settings).await {
        Ok(opened) => opened,
        Err(error) => {
            return vec![Item::fail(
                format!("RabbitMQ at {} did not answer: {}", settings.url, crate::error::chain(&error)),
                "check --amqp-url (AMQP_URL): host, port, vhost (%2f for /), user and password, and the user's permissions on the vhost",
            )];
        }
    };
    let mut items = vec![Item::pass(format!("RabbitMQ reachable at {}", settings.url))];
    match exchange_exists(settings, &channel).await {
        Ok(()) => items.push(Item::pass(format!("exchange {} exists", settings.exchange))),
        Err(error) => {
            items.push(Item::fail(
                format!("exchange {} cannot be used: {}", settings.exchange, crate::error::chain(&error)),
                "run `outbox-relay setup --sink rabbitmq` (declares it), or declare a durable topic exchange of that name; the user needs configure, write and read rights on the vhost",
            ));
            let _ = connection.close(200, "check done".into()).await;
            return items;
        }
    }
    let found = match ShortString::try_new(dead_letter_key) {
        Ok(queue) => channel
            .queue_declare(
                queue,
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    items.push(match found {
        Ok(()) => Item::pass(format!("dead-letter queue {dead_letter_key} exists")),
        Err(error) => Item::fail(
            format!("no queue {dead_letter_key} for dead letters: {error}"),
            format!(
                "run `outbox-relay setup --sink rabbitmq`, or bind a durable queue to exchange {} with routing key {dead_letter_key}",
                settings.exchange
            ),
        ),
    });
    let _ = connection.close(200, "check done".into()).await;
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_longer_than_amqp_allows_are_configuration_errors_not_panics() {
        let long = "x".repeat(256);
        let error = AmqpSettings::new(&format!("amqp://u:p@h:5672/{long}"), "outbox").err();
        assert!(error.is_some_and(|e| e.contains("vhost")));
        let error = AmqpSettings::new("amqp://u:p@h:5672/%2f", &long).err();
        assert!(error.is_some_and(|e| e.starts_with("--amqp-exchange")));
    }

    #[test]
    fn the_url_is_shown_without_its_password() {
        let url = AmqpUrl::parse("amqp://relay:s3cret@mq.example:5673/%2f").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(url.to_string(), "amqp://relay@mq.example:5673/%2f");
        assert!(!format!("{url:?}").contains("s3cret"));
        let error = AmqpUrl::parse("not a url with s3cret").err().unwrap_or_default();
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn a_missing_exchange_or_refused_access_is_fatal_a_lost_connection_transient() {
        use lapin::protocol::AMQPError;
        let protocol = |kind| lapin::Error::from(lapin::ErrorKind::ProtocolError(AMQPError::new(kind, "x".into())));
        assert_eq!(
            classify(&protocol(AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))),
            ErrorClass::Fatal
        );
        assert_eq!(
            classify(&protocol(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED))),
            ErrorClass::Fatal
        );
        assert_eq!(
            classify(&protocol(AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED))),
            ErrorClass::Transient
        );
        let io = lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(classify(&io), ErrorClass::Transient);
    }
}
