//! `cacheclear doctor`'s Kafka checks, shared by `run` (the Kafka sink's topic) and `invalidate`
//! (its input topics, dead-letter topic and consumer group).

use std::collections::BTreeMap;
use std::time::Duration;

use cacheclear_protocol::Check;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// How long one metadata or offset request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What a topic is for, in the findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicRole {
    /// The Kafka sink writes bus records to it (`kafka.topic` of `run`).
    Sink,
    /// The invalidator reads it (`kafka.topics`, `kafka.debezium_topics`).
    Input,
    /// The invalidator writes malformed records to it (`kafka.dead_letter_topic`).
    DeadLetter,
}

/// Runs the Kafka checks: `kafka.connect` (cluster metadata from `brokers`, with `properties`
/// such as `security.protocol` and SASL settings applied), `kafka.topic` per topic (exists, and
/// its partition count), and, with `group`, `kafka.group` (committed offset and lag per
/// partition of each input topic). Blocking librdkafka calls run on a blocking thread. Never
/// fails itself: an error becomes a `fail` finding. Secrets in `properties` never appear in a
/// finding.
pub async fn diagnose(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topics: &[(String, TopicRole)],
    group: Option<&str>,
) -> Vec<Check> {
    let brokers = brokers.to_owned();
    let properties = properties.clone();
    let topics = topics.to_vec();
    let group = group.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        diagnose_blocking(&brokers, &properties, &topics, group.as_deref())
    })
    .await
    .unwrap_or_else(|e| {
        vec![Check::fail(
            "kafka.connect",
            format!("the Kafka check panicked: {e}"),
            "report this as a bug",
        )]
    })
}

fn diagnose_blocking(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topics: &[(String, TopicRole)],
    group: Option<&str>,
) -> Vec<Check> {
    let mut cfg = ClientConfig::new();
    for (k, v) in properties {
        cfg.set(k, v);
    }
    cfg.set("bootstrap.servers", brokers)
        .set("group.id", group.unwrap_or("cacheclear-doctor"))
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = match cfg.create() {
        Ok(c) => c,
        Err(e) => {
            return vec![Check::fail(
                "kafka.connect",
                format!("cannot create a Kafka client: {e}"),
                "check kafka.properties (a librdkafka property name or value is invalid)",
            )];
        }
    };
    let metadata = match consumer.fetch_metadata(None, TIMEOUT) {
        Ok(m) => m,
        Err(e) => {
            return vec![Check::fail(
                "kafka.connect",
                format!(
                    "no cluster metadata from {brokers} within {} s: {e}",
                    TIMEOUT.as_secs()
                ),
                "check kafka.brokers and, for MSK/Confluent, kafka.properties (security.protocol = SASL_SSL, sasl.mechanism, sasl.username, sasl.password)",
            )];
        }
    };
    let mut checks = vec![Check::ok(
        "kafka.connect",
        format!(
            "connected to {brokers}: {} broker(s), {} topic(s)",
            metadata.brokers().len(),
            metadata.topics().len()
        ),
    )];
    for (topic, role) in topics {
        let what = match role {
            TopicRole::Sink => "the sink's topic (kafka.topic)",
            TopicRole::Input => "an input topic",
            TopicRole::DeadLetter => "the dead-letter topic (kafka.dead_letter_topic)",
        };
        match metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
        {
            Some(t) => checks.push(Check::ok(
                "kafka.topic",
                format!("`{topic}`, {what}: {} partition(s)", t.partitions().len()),
            )),
            None => checks.push(Check::fail(
                "kafka.topic",
                format!("`{topic}`, {what}, does not exist"),
                format!(
                    "create it: kafka-topics.sh --create --topic {topic} --partitions 12 --replication-factor 3 (cacheclear never auto-creates topics)"
                ),
            )),
        }
    }
    if let Some(group) = group {
        let mut list = TopicPartitionList::new();
        for (topic, role) in topics {
            if *role != TopicRole::Input {
                continue;
            }
            if let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) {
                for p in t.partitions() {
                    list.add_partition(topic, p.id());
                }
            }
        }
        match consumer.committed_offsets(list, TIMEOUT) {
            Ok(committed) => {
                let mut lags = Vec::new();
                let mut total = 0i64;
                for e in committed.elements() {
                    let (low, high) = consumer
                        .fetch_watermarks(e.topic(), e.partition(), TIMEOUT)
                        .unwrap_or((0, 0));
                    let at = match e.offset() {
                        Offset::Offset(o) => o,
                        _ => low,
                    };
                    let lag = (high - at).max(0);
                    total += lag;
                    lags.push(format!("{}[{}] {lag}", e.topic(), e.partition()));
                }
                let found = format!(
                    "group `{group}`: lag {total} record(s) in all ({})",
                    lags.join(", ")
                );
                checks.push(if total > 10_000 {
                    Check::warn(
                        "kafka.group",
                        found,
                        "the group is behind: start more `cacheclear invalidate` members (up to one per partition) or check their logs",
                    )
                } else {
                    Check::ok("kafka.group", found)
                });
            }
            Err(e) => checks.push(Check::warn(
                "kafka.group",
                format!("group `{group}`: committed offsets not readable: {e}"),
                "the user needs DESCRIBE on the group (ACL)",
            )),
        }
    }
    checks
}
