//! RabbitMQ for the tests: the shared node (or the real one named by `AMQP_URL`), and a
//! queue bound to a test's exchange from which the tests read what the relay published.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};

/// The URL of the RabbitMQ every RabbitMQ test shares (started on first use).
pub fn shared_url() -> String {
    static NODE: OnceLock<(String, Option<devrig::RabbitMq>)> = OnceLock::new();
    NODE.get_or_init(|| match std::env::var("AMQP_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let node = devrig::RabbitMq::start().unwrap_or_else(|e| panic!("cannot start RabbitMQ: {e}"));
            (node.url(), Some(node))
        }
    })
    .0
    .clone()
}

/// Declares a durable `queue` bound to `exchange` by `binding`. Declare it before the
/// relay publishes: RabbitMQ keeps nothing for a queue that does not exist.
pub async fn declare(url: &str, exchange: &str, queue: &str, binding: &str) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ: {e}"));
    let channel = connection.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot declare queue {queue}: {e}"));
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot bind queue {queue} to {exchange}: {e}"));
    let _ = connection.close(200, "declared".into()).await;
}

/// One message as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Message {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub kind: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub headers: Vec<(String, Option<String>)>,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| value.clone())
    }

    pub fn id(&self) -> String {
        self.message_id.clone().unwrap_or_default()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A durable queue bound to `exchange` by `binding`, read from the start.
pub struct Queue {
    connection: Connection,
    consumer: lapin::Consumer,
    pub messages: Vec<Message>,
}

impl Queue {
    /// Declares `queue` (durable, so it outlives a broker restart), binds it and reads it.
    pub async fn bind(url: &str, exchange: &str, queue: &str, binding: &str) -> Queue {
        declare(url, exchange, queue, binding).await;
        Self::open(url, queue).await
    }

    /// Reads an existing queue.
    pub async fn open(url: &str, queue: &str) -> Queue {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ: {e}"));
        Self::consume(connection, queue).await
    }

    async fn consume(connection: Connection, queue: &str) -> Queue {
        let channel = connection.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
        channel
            .basic_qos(2000, BasicQosOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("cannot consume {queue}: {e}"));
        Queue {
            connection,
            consumer,
            messages: Vec::new(),
        }
    }

    /// Reads until `done(messages so far)` holds; panics after `timeout`.
    pub async fn read_until(&mut self, timeout: Duration, what: &str, mut done: impl FnMut(&[Message]) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.messages) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; {} messages read",
                    self.messages.len()
                );
            }
            match tokio::time::timeout(left.min(Duration::from_millis(500)), self.consumer.next()).await {
                Ok(Some(Ok(delivery))) => self.messages.push(message(&delivery)),
                Ok(Some(Err(error))) => panic!("consuming failed: {error}"),
                Ok(None) => panic!("the consumer ended"),
                Err(_) => {}
            }
        }
    }

    /// Reads what arrives within `quiet` of the last message (for checking that nothing
    /// more comes).
    pub async fn read_quiet(&mut self, quiet: Duration) {
        while let Ok(Some(Ok(delivery))) = tokio::time::timeout(quiet, self.consumer.next()).await {
            self.messages.push(message(&delivery));
        }
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

fn message(delivery: &lapin::message::Delivery) -> Message {
    let properties = &delivery.properties;
    let text = |value: &AMQPValue| match value {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        _ => None,
    };
    Message {
        routing_key: delivery.routing_key.as_str().to_owned(),
        body: delivery.data.clone(),
        message_id: properties.message_id().as_ref().map(|s| s.as_str().to_owned()),
        kind: properties.kind().as_ref().map(|s| s.as_str().to_owned()),
        content_type: properties.content_type().as_ref().map(|s| s.as_str().to_owned()),
        delivery_mode: *properties.delivery_mode(),
        headers: properties
            .headers()
            .as_ref()
            .map(|table| {
                table
                    .inner()
                    .iter()
                    .map(|(name, value)| (name.as_str().to_owned(), text(value)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}
