//! `check`'s questions to Kafka: the client settings, the bootstrap servers and the
//! dead-letter topic.

use std::time::Duration;

use rdkafka::producer::Producer as _;

use super::{Producer, ProducerSettings};
use crate::check::Item;

/// Kafka: the client settings, the bootstrap servers and the dead-letter topic.
pub async fn check(settings: &ProducerSettings, dead_letter_topic: &str) -> Vec<Item> {
    let mut report = Vec::new();
    let producer = match Producer::new(settings) {
        Ok(producer) => producer,
        Err(error) => {
            report.push(Item::fail(
                format!("Kafka client settings: {error}"),
                "correct the --kafka-property named above",
            ));
            return report;
        }
    };
    let servers = settings.bootstrap_servers.clone();
    let topic = dead_letter_topic.to_owned();
    let answer = tokio::task::spawn_blocking(move || {
        let client = producer.inner().client();
        let brokers = client
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|metadata| metadata.brokers().len());
        let topic = brokers.is_ok().then(|| {
            client
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map_err(|e| e.to_string())
                .and_then(|metadata| match metadata.topics().first() {
                    Some(found) if found.error().is_none() => Ok(found.partitions().len()),
                    Some(found) => Err(format!("{:?}", found.error())),
                    None => Err("no metadata".to_owned()),
                })
        });
        (brokers, topic)
    })
    .await;
    let Ok((brokers, topic_answer)) = answer else {
        report.push(Item::fail("Kafka: the check itself failed", "run it again"));
        return report;
    };
    match brokers {
        Ok(count) => report.push(Item::pass(format!("Kafka reachable at {servers} ({count} broker(s))"))),
        Err(error) => {
            report.push(Item::fail(
                format!("Kafka at {servers} did not answer: {error}"),
                "check --bootstrap-servers (KAFKA_BOOTSTRAP_SERVERS), the network, and TLS/SASL settings (--kafka-property)",
            ));
            report.push(Item::skip("topics (no broker)"));
            return report;
        }
    }
    let topic = dead_letter_topic;
    match topic_answer {
        Some(Ok(partitions)) => report.push(Item::pass(format!(
            "topic {topic} exists or was created on demand ({partitions} partition(s)); event topics are created the same way"
        ))),
        Some(Err(error)) => report.push(Item::fail(
            format!("topic {topic} does not exist and was not created: {error}"),
            "create the dead-letter topic and the topics of --topic-template, or enable auto.create.topics.enable; the principal needs Describe and Write on them",
        )),
        None => {}
    }
    report
}
