//! `cacheclear doctor --config FILE [--json]`: checks a deployment from the config `run` or
//! `invalidate` uses, one line per check (ok / warn / fail, what was found, the fix). The checks
//! themselves live with the component they check (`cacheclear_source_postgres::doctor`,
//! `cacheclear_sink_redis::doctor`, `cacheclear_sink_kafka::doctor`).

use std::path::Path;

use cacheclear_protocol::{Check, Status};
use cacheclear_sink_kafka::doctor::TopicRole;

use crate::config::{AppConfig, SinkChoice};
use crate::invalidate::InvalidateFile;

/// Runs every check the config at `path` calls for and prints them (`json`: one object
/// `{"checks": [{"id", "status", "found", "fix"}]}`). Returns whether nothing failed.
///
/// The file is read as an invalidator config when its `[kafka]` section has a `group_id`
/// (what `invalidate` reads), otherwise as `run`'s.
///
/// # Errors
/// The config cannot be read or is invalid (the same errors `run` and `invalidate` give).
pub async fn doctor(path: &Path, json: bool) -> anyhow::Result<bool> {
    let checks = if is_invalidator_config(path) {
        let (cfg, _, _) = InvalidateFile::load(path)?;
        let mut checks = cacheclear_sink_redis::doctor::diagnose(&cfg.redis).await;
        checks.push(match &cfg.kafka.instance_id {
            Some(id) => Check::ok(
                "kafka.instance_id",
                format!("static group membership as `{id}`"),
            ),
            None => Check::warn(
                "kafka.instance_id",
                "no kafka.instance_id: dynamic group membership",
                "give each member a stable, unique kafka.instance_id (the pod name; %H-%i in systemd): a restarted member then reclaims its partitions at once, and brokers that never reassign a dead member's partitions (tansu 0.6.0) do not leave them unowned",
            ),
        });
        let mut topics: Vec<(String, TopicRole)> = cfg
            .kafka
            .topics
            .iter()
            .chain(&cfg.kafka.debezium_topics)
            .map(|t| (t.clone(), TopicRole::Input))
            .collect();
        topics.push((cfg.kafka.dead_letter_topic.clone(), TopicRole::DeadLetter));
        checks.extend(
            cacheclear_sink_kafka::doctor::diagnose(
                &cfg.kafka.brokers,
                &cfg.kafka.properties,
                &topics,
                Some(&cfg.kafka.group_id),
            )
            .await,
        );
        checks
    } else {
        let (cfg, rules) = AppConfig::load(path)?;
        let mut checks = cacheclear_source_postgres::doctor::diagnose(&cfg.postgres, &rules).await;
        match cfg.sink()? {
            SinkChoice::Redis(redis) => {
                checks.extend(cacheclear_sink_redis::doctor::diagnose(&redis).await)
            }
            SinkChoice::Kafka(kafka) => checks.extend(
                cacheclear_sink_kafka::doctor::diagnose(
                    &kafka.brokers,
                    &kafka.properties,
                    &[(kafka.topic.clone(), TopicRole::Sink)],
                    None,
                )
                .await,
            ),
        }
        checks
    };
    print(&checks, json)?;
    Ok(checks.iter().all(|c| c.status != Status::Fail))
}

fn is_invalidator_config(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("kafka")?.as_table()?.get("group_id").cloned())
        .is_some()
}

fn print(checks: &[Check], json: bool) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "checks": checks }))?
        );
        return Ok(());
    }
    for c in checks {
        let status = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        println!("{status} {:<32} {}", c.id, c.found);
        if let Some(fix) = &c.fix {
            println!("     {:<32} fix: {fix}", "");
        }
    }
    let count = |s| checks.iter().filter(|c| c.status == s).count();
    println!(
        "\n{} ok, {} warn, {} fail",
        count(Status::Ok),
        count(Status::Warn),
        count(Status::Fail)
    );
    Ok(())
}
