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
/// partition of each input topic) and `kafka.group_owners` (every input partition assigned to a
/// live member). Blocking librdkafka calls run on a blocking thread. Never
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
        checks.push(owners(&consumer, &metadata, topics, group));
    }
    checks
}

/// `kafka.group_owners`: every partition of the input topics is assigned to a live member.
fn owners(
    consumer: &BaseConsumer,
    metadata: &rdkafka::metadata::Metadata,
    topics: &[(String, TopicRole)],
    group: &str,
) -> Check {
    let id = "kafka.group_owners";
    let groups = match consumer.fetch_group_list(Some(group), TIMEOUT) {
        Ok(g) => g,
        Err(e) => {
            return Check::warn(
                id,
                format!("group `{group}`: members not readable: {e}"),
                "the user needs DESCRIBE on the group (ACL)",
            );
        }
    };
    let mut owned = std::collections::BTreeSet::new();
    let mut members = 0;
    let state = groups
        .groups()
        .iter()
        .find(|g| g.name() == group)
        .map_or_else(|| "not found".to_owned(), |g| g.state().to_owned());
    for g in groups.groups().iter().filter(|g| g.name() == group) {
        for m in g.members() {
            members += 1;
            if let Some(bytes) = m.assignment() {
                for (topic, partition) in parse_assignment(bytes).unwrap_or_default() {
                    owned.insert((topic, partition));
                }
            }
        }
    }
    let mut unowned = Vec::new();
    for (topic, role) in topics {
        if *role != TopicRole::Input {
            continue;
        }
        if let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) {
            for p in t.partitions() {
                if !owned.contains(&(topic.clone(), p.id())) {
                    unowned.push(format!("{topic}[{}]", p.id()));
                }
            }
        }
    }
    if state == "not found" {
        return Check::warn(
            id,
            format!(
                "the broker does not describe group `{group}` (ListGroups/DescribeGroups answered without it; tansu 0.6.0 does this)"
            ),
            "cannot tell which partitions have an owner here: compare kafka.group's lag over time, or check with the broker's own tools",
        );
    }
    if members > 0 && owned.is_empty() {
        // Members but no readable assignment at all (tansu 0.6.0 answers so): every partition
        // would look unowned, including those being consumed.
        return Check::warn(
            id,
            format!(
                "group `{group}`: {members} member(s), but the broker describes no member's assignment (tansu 0.6.0 does this)"
            ),
            "cannot tell which partitions have an owner here: compare kafka.group's lag over time, or check with the broker's own tools",
        );
    }
    if members == 0 {
        return Check::warn(
            id,
            format!("group `{group}` has no live member (group state: {state})"),
            "start `cacheclear invalidate` (nothing is invalidated meanwhile)",
        );
    }
    if unowned.is_empty() {
        Check::ok(
            id,
            format!("group `{group}`: {members} member(s) own every input partition"),
        )
    } else {
        Check::fail(
            id,
            format!(
                "group `{group}`: {members} member(s), partitions without an owner: {}",
                unowned.join(", ")
            ),
            "their records are not invalidated: give each member a kafka.instance_id (static membership) and restart them; on brokers that do not reassign a dead member's partitions (tansu 0.6.0) a restarted member with the same id reclaims them",
        )
    }
}

/// The Kafka consumer protocol's `MemberAssignment` (version, then topics with their
/// partitions, then user data), as `(topic, partition)` pairs; `None` when malformed.
fn parse_assignment(bytes: &[u8]) -> Option<Vec<(String, i32)>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = bytes.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let _version = take(2)?;
    let topics = i32::from_be_bytes(take(4)?.try_into().ok()?);
    let mut out = Vec::new();
    for _ in 0..topics.max(0) {
        let len = i16::from_be_bytes(take(2)?.try_into().ok()?);
        let name = String::from_utf8(take(usize::try_from(len).ok()?)?.to_vec()).ok()?;
        let n = i32::from_be_bytes(take(4)?.try_into().ok()?);
        for _ in 0..n.max(0) {
            out.push((name.clone(), i32::from_be_bytes(take(4)?.try_into().ok()?)));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::parse_assignment;

    #[test]
    fn member_assignments_parse_and_truncation_is_refused() {
        // version 0, 1 topic "t" with partitions 0 and 3, no user data.
        let bytes = [
            0, 0, 0, 0, 0, 1, 0, 1, b't', 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3,
        ];
        assert_eq!(
            parse_assignment(&bytes),
            Some(vec![("t".to_owned(), 0), ("t".to_owned(), 3)])
        );
        assert_eq!(parse_assignment(&bytes[..15]), None);
        assert_eq!(parse_assignment(&[]), None);
    }
}
