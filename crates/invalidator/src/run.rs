//! The consume → apply → commit loop.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cacheclear_protocol::{BusControl, Lsn};
use cacheclear_rules::Rules;
use cacheclear_sink_redis::{BusWatermark, BusWatermarkOutcome, RedisSink, RedisSinkError};
use futures::{FutureExt, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::task::JoinSet;

use crate::KafkaConfig;
use crate::decode::{Decoded, Decoder, Format, Malformed};
use crate::dlq::{self, DeadLetter, DeadLetterCheckError, Outcome};
use crate::offsets::{OffsetTracker, Ownership, Tp};
use crate::telemetry;
use crate::{AppliedBatch, InvalidatorConfig, InvalidatorStatus, RunOptions, now_us};

/// Errors that stop the invalidator (everything transient is retried inside).
#[derive(Debug, thiserror::Error)]
pub enum InvalidatorError {
    /// The configuration is invalid (names the field).
    #[error("invalid configuration: {0}")]
    Config(#[from] cacheclear_protocol::ConfigError),
    /// librdkafka refused to create the consumer or producer, or to subscribe.
    #[error("Kafka client: {0}")]
    Kafka(#[from] KafkaError),
    /// The Redis sink refused its configuration.
    #[error("Redis sink: {0}")]
    Redis(#[from] RedisSinkError),
    /// The dead-letter topic is missing, not accessible or has a partition without leader (see
    /// [`crate::check_dead_letter_topic`]; the message names the topic and the fix).
    #[error("{0}")]
    DeadLetterTopic(#[from] DeadLetterCheckError),
}

/// Dead letters produced at once (each in its own task); the consume loop waits for one to end
/// before taking more records when this many are under way.
const MAX_DEAD_LETTERS_IN_FLIGHT: usize = 256;

/// Records of one partition held uncommitted behind a dead letter still being retried before the
/// partition is paused (resumed when its dead letter lands, or on its next assignment). Bounds
/// the memory a stuck partition costs (the tracker keeps one entry per held record).
const MAX_HELD_PER_PARTITION: usize = 100_000;

/// Records assignments and revocations for the consume loop (rebalance callbacks run inside
/// `recv`, on the loop's own task).
struct GroupContext {
    ownership: Arc<Ownership>,
    status: Arc<InvalidatorStatus>,
    group: String,
}

fn tps(list: &TopicPartitionList) -> Vec<Tp> {
    list.elements()
        .iter()
        .map(|e| Tp {
            topic: e.topic().to_owned(),
            partition: e.partition(),
        })
        .collect()
}

impl ClientContext for GroupContext {}

impl GroupContext {
    /// Publishes how many partitions this member owns now (status and gauge).
    fn record_assigned(&self) {
        let owned = self.ownership.owned().len() as u64;
        self.status
            .assigned
            .store(owned, std::sync::atomic::Ordering::Release);
        metrics::gauge!(telemetry::ASSIGNED_PARTITIONS).set(owned as f64);
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let revoked = tps(list);
                tracing::info!(group = %self.group, partitions = ?revoked, "partitions revoked; their in-flight work is dropped uncommitted");
                metrics::counter!(telemetry::REBALANCES, "kind" => "revoke").increment(1);
                self.ownership.revoke(revoked);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "rebalance error; dropping every assignment");
                self.ownership.revoke_all();
            }
        }
        self.record_assigned();
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            // A partition paused behind a dead letter under an earlier assignment starts afresh.
            if let Err(e) = consumer.resume(list) {
                tracing::debug!(error = %e, "resume of newly assigned partitions");
            }
            let assigned = tps(list);
            tracing::info!(group = %self.group, partitions = ?assigned, "partitions assigned");
            metrics::counter!(telemetry::REBALANCES, "kind" => "assign").increment(1);
            self.ownership.assign(assigned);
        }
        self.record_assigned();
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            // Not fatal: the records are applied; the next commit (or a replay) covers them.
            tracing::warn!(group = %self.group, error = %e, offsets = ?tps(offsets), "offset commit failed");
            metrics::counter!(telemetry::COMMIT_ERRORS).increment(1);
        }
    }
}

/// A record's key and value as received (either may be null).
type RawRecord = (Option<Vec<u8>>, Option<Vec<u8>>);

/// One received record, decoded.
struct Received {
    tp: Tp,
    generation: u64,
    offset: i64,
    /// The record's Kafka timestamp, ms.
    timestamp_ms: Option<i64>,
    outcome: Result<Decoded, Malformed>,
    /// Key and value, kept for the dead-letter topic (malformed records only).
    raw: Option<RawRecord>,
}

/// The librdkafka properties of the invalidator's consumer: its defaults
/// (`auto.offset.reset = earliest`, `fetch.wait.max.ms = 10`, `socket.nagle.disable`), then
/// `kafka.properties` (security settings such as `security.protocol = SASL_SSL`,
/// `sasl.mechanisms`, `sasl.username`, `sasl.password`, `ssl.ca.location` go there), then what the
/// invalidator owns: `bootstrap.servers`, `group.id`, manual offset commits and, with
/// `kafka.instance_id`, static membership (`group.instance.id`, `session.timeout.ms = 30000`
/// unless set). The dead-letter producer's are [`crate::dead_letter_producer_config`].
pub fn consumer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .set("socket.nagle.disable", "true");
    for (k, v) in &kafka.properties {
        client.set(k, v);
    }
    client
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    if let Some(id) = &kafka.instance_id {
        // Static membership (KIP-345): a restarted member reclaims its partitions.
        client.set("group.instance.id", id);
        if !kafka.properties.contains_key("session.timeout.ms") {
            client.set("session.timeout.ms", "30000");
        }
    }
    client
}

/// Runs the invalidator until `shutdown` completes: subscribes `cfg.kafka.group_id` to the input
/// topics, applies batches to `cfg.redis`, commits what Redis acknowledged.
///
/// Returns `Ok(())` after `shutdown`, once the last acknowledged offsets are committed
/// (synchronously). Work not yet acknowledged is left uncommitted and replayed by whoever owns
/// its partition next.
///
/// # Errors
/// [`InvalidatorError`] when the configuration is invalid, the Kafka clients cannot be created,
/// or Redis refuses the credentials or the certificate at start
/// ([`RedisSinkError::is_fatal`]); broker and Redis outages are retried, never returned.
pub async fn run(
    cfg: &InvalidatorConfig,
    rules: Arc<Rules>,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), InvalidatorError> {
    cfg.kafka.validate().map_err(InvalidatorError::Config)?;
    let sink = RedisSink::connect(cfg.redis.clone())?;
    // Refused credentials or certificates stop the invalidator at start; an unreachable Redis
    // is waited for (every batch is retried until Redis acknowledges it).
    if let Err(e) = sink.check().await {
        if e.is_fatal() {
            return Err(InvalidatorError::Redis(e));
        }
        tracing::warn!(error = %e, "Redis does not answer yet; batches are retried until it does");
    }
    let decoder = Decoder::for_config(cfg, rules).await?;
    let formats: HashMap<String, Format> = cfg
        .kafka
        .topics
        .iter()
        .map(|t| (t.clone(), Format::Bus))
        .chain(
            cfg.kafka
                .debezium_topics
                .iter()
                .map(|t| (t.clone(), Format::Debezium)),
        )
        .collect();
    let ownership = Arc::new(Ownership::default());
    let status = Arc::clone(&options.status);

    let client = consumer_config(&cfg.kafka);
    let producer_cfg = dlq::producer_config(&cfg.kafka);
    let consumer: StreamConsumer<GroupContext> = client.create_with_context(GroupContext {
        ownership: Arc::clone(&ownership),
        status: Arc::clone(&status),
        group: cfg.kafka.group_id.clone(),
    })?;
    let producer: FutureProducer = producer_cfg.create()?;
    tokio::pin!(shutdown);
    // The dead-letter topic must be able to take malformed records before any is read: a
    // definitive refusal stops here with the fix; unreachable brokers are waited for.
    let mut backoff = Duration::from_millis(500);
    loop {
        match crate::check_dead_letter_topic(&cfg.kafka).await {
            Ok(t) => {
                tracing::info!(dead_letter_topic = %t.topic, partitions = t.partitions, "dead-letter topic checked");
                break;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "dead-letter topic check: brokers unreachable; retrying");
                tokio::select! {
                    biased;
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let topics: Vec<&str> = formats.keys().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    tracing::info!(group = %cfg.kafka.group_id, topics = ?topics, "invalidator subscribed");

    let max_records = cfg.kafka.batch_max_records;
    let max_wait = Duration::from_millis(cfg.kafka.batch_max_wait_ms);
    let mut tracker = OffsetTracker::default();
    let mut batch: Vec<Received> = Vec::with_capacity(max_records.min(65_536));
    // One message stream for the whole run (a `recv()` future per call would hold the consumer's
    // waker slab behind a higher-ranked borrow, which makes this future non-`Send`).
    let mut messages = consumer.stream();
    let commit_interval = Duration::from_millis(cfg.kafka.commit_interval_ms);
    let mut last_commit = tokio::time::Instant::now();
    // Records applied since the last commit.
    let mut uncommitted = false;
    // Dead letters under way, each in its own task (dropping the set on return aborts them:
    // their records stay uncommitted and are read again).
    let mut dead_letters: JoinSet<(DeadLetter, Outcome)> = JoinSet::new();
    // Partitions paused behind a dead letter, with the generation they were paused under.
    let mut paused: HashMap<Tp, u64> = HashMap::new();
    'outer: loop {
        batch.clear();
        // The first record (or shutdown, or the due commit of an idle stream, or a dead letter
        // that ended), then more until the batch is full or max_wait passed. While
        // MAX_DEAD_LETTERS_IN_FLIGHT dead letters are under way, no record is taken.
        let first = tokio::select! {
            biased;
            () = &mut shutdown => break 'outer,
            Some(done) = dead_letters.join_next(), if !dead_letters.is_empty() => {
                if let Err(e) = &done {
                    // Only a panic gets here (tasks are aborted only when the loop ends): its
                    // partition stays uncommitted from that record on, and is replayed by its
                    // next owner.
                    tracing::error!(error = %e, "a dead-letter task failed; its partition is not committed past its record until the next rebalance or restart");
                }
                if let Ok((dl, outcome)) = done {
                    dead_letter_done(&dl, outcome, &mut tracker, &status);
                    if paused.get(&dl.tp) == Some(&dl.generation)
                        && tracker.held(&dl.tp) <= MAX_HELD_PER_PARTITION / 2
                    {
                        paused.remove(&dl.tp);
                        resume(&consumer, &dl.tp, &ownership, dl.generation);
                    }
                    uncommitted = true;
                }
                continue 'outer;
            }
            () = tokio::time::sleep_until(last_commit + commit_interval), if uncommitted => {
                commit_applied(&consumer, &mut tracker, &ownership, &status);
                (last_commit, uncommitted) = (tokio::time::Instant::now(), false);
                continue 'outer;
            }
            m = messages.next(), if dead_letters.len() < MAX_DEAD_LETTERS_IN_FLIGHT => match m {
                Some(m) => m,
                None => break 'outer,
            },
        };
        batch.extend(received(first, &formats, &decoder, &ownership));
        // Malformed records in this batch: with the dead letters under way, at most
        // MAX_DEAD_LETTERS_IN_FLIGHT (each holds a copy of its record).
        let mut malformed = batch.iter().filter(|r| r.outcome.is_err()).count();
        // Then whatever librdkafka has already fetched, without waiting for more: the batch
        // ends when it is full, when nothing more is ready (an idle stream is not delayed), or
        // after `batch_max_wait_ms` of collecting (a busy stream is not starved of commits).
        let deadline = std::time::Instant::now() + max_wait;
        while batch.len() < max_records
            && std::time::Instant::now() < deadline
            && dead_letters.len() + malformed < MAX_DEAD_LETTERS_IN_FLIGHT
        {
            match messages.next().now_or_never() {
                Some(None) => break 'outer,
                Some(Some(m)) => {
                    let r = received(m, &formats, &decoder, &ownership);
                    malformed += usize::from(r.as_ref().is_some_and(|r| r.outcome.is_err()));
                    batch.extend(r);
                }
                None => break,
            }
        }
        // Records of partitions revoked while the batch filled are dropped (not applied, not
        // committed): the partition's next owner reads them again.
        let before = batch.len();
        batch.retain(|r| ownership.generation(&r.tp) == Some(r.generation));
        let dropped = (before - batch.len()) as u64;
        if dropped > 0 {
            InvalidatorStatus::add(&status.records_dropped, dropped);
            metrics::counter!(telemetry::RECORDS, "outcome" => "dropped_revoked")
                .increment(dropped);
        }
        if batch.is_empty() {
            continue;
        }
        for r in &batch {
            tracker.received(&r.tp, r.generation, r.offset);
        }

        // Malformed records go to the dead-letter topic from tasks of their own: a retried one
        // holds back its partition's commits only, never the loop.
        for r in &mut batch {
            if let Err(reason) = &r.outcome {
                let (key, value) = r.raw.take().unwrap_or((None, None));
                let dl = DeadLetter {
                    tp: r.tp.clone(),
                    generation: r.generation,
                    offset: r.offset,
                    reason: reason.0.clone(),
                    key,
                    value,
                };
                let producer = producer.clone();
                let topic = cfg.kafka.dead_letter_topic.clone();
                dead_letters.spawn(async move {
                    let outcome = dlq::produce(&dl, &producer, &topic).await;
                    (dl, outcome)
                });
            }
        }
        if !apply(&batch, &sink, &options, &mut shutdown).await {
            break 'outer; // shutdown while retrying: nothing of this batch is committed
        }
        for r in batch.iter().filter(|r| r.outcome.is_ok()) {
            tracker.applied(&r.tp, r.generation, r.offset);
        }
        // A partition piling up records behind a dead letter being retried is paused.
        for r in &batch {
            if paused.get(&r.tp) != Some(&r.generation)
                && tracker.held(&r.tp) > MAX_HELD_PER_PARTITION
            {
                let mut list = TopicPartitionList::new();
                list.add_partition(&r.tp.topic, r.tp.partition);
                match consumer.pause(&list) {
                    Ok(()) => {
                        tracing::warn!(topic = %r.tp.topic, partition = r.tp.partition, held = tracker.held(&r.tp), "partition paused: its records wait uncommitted behind a dead letter being retried");
                        paused.insert(r.tp.clone(), r.generation);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot pause a partition"),
                }
            }
        }
        uncommitted = true;
        if last_commit.elapsed() >= commit_interval {
            commit_applied(&consumer, &mut tracker, &ownership, &status);
            (last_commit, uncommitted) = (tokio::time::Instant::now(), false);
        }
    }

    // Shutdown: make the last acknowledged offsets durable before leaving the group (including
    // those applied since the last periodic commit).
    let _ = tracker.take_commits(|tp| ownership.generation(tp));
    let last = tracker.committed(|tp| ownership.generation(tp));
    if !last.is_empty() {
        let mut list = TopicPartitionList::new();
        for (tp, offset) in &last {
            let _ = list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset));
        }
        if let Err(e) = consumer.commit(&list, CommitMode::Sync) {
            tracing::warn!(error = %e, "final offset commit failed; the next owner replays from the previous commit");
        }
    }
    consumer.unsubscribe();
    tracing::info!(group = %cfg.kafka.group_id, "invalidator stopped");
    Ok(())
}

/// Accounts for a dead letter that ended: its offset becomes committable.
fn dead_letter_done(
    dl: &DeadLetter,
    outcome: Outcome,
    tracker: &mut OffsetTracker,
    status: &InvalidatorStatus,
) {
    tracker.applied(&dl.tp, dl.generation, dl.offset);
    match outcome {
        Outcome::Produced | Outcome::BoundedCopy => {
            InvalidatorStatus::add(&status.records_dead_lettered, 1);
            metrics::counter!(telemetry::RECORDS, "outcome" => "dead_lettered").increment(1);
            if outcome == Outcome::BoundedCopy {
                InvalidatorStatus::add(&status.dead_letter_bounded_copies, 1);
                metrics::counter!(telemetry::DLQ_BOUNDED_COPIES).increment(1);
            }
        }
        Outcome::Refused => {
            InvalidatorStatus::add(&status.records_dead_letter_refused, 1);
            metrics::counter!(telemetry::RECORDS, "outcome" => "dead_letter_refused").increment(1);
        }
    }
}

/// Resumes `tp` if it is still owned under `generation`.
fn resume(
    consumer: &StreamConsumer<GroupContext>,
    tp: &Tp,
    ownership: &Ownership,
    generation: u64,
) {
    if ownership.generation(tp) != Some(generation) {
        return; // revoked meanwhile: its next assignment starts resumed
    }
    let mut list = TopicPartitionList::new();
    list.add_partition(&tp.topic, tp.partition);
    match consumer.resume(&list) {
        Ok(()) => {
            tracing::info!(topic = %tp.topic, partition = tp.partition, "partition resumed: its dead letter landed")
        }
        Err(e) => tracing::warn!(error = %e, "cannot resume a partition"),
    }
}

/// Commits (asynchronously) every owned partition's offset past its last record Redis
/// acknowledged, where that moved since the last commit.
fn commit_applied(
    consumer: &StreamConsumer<GroupContext>,
    tracker: &mut OffsetTracker,
    ownership: &Ownership,
    status: &InvalidatorStatus,
) {
    let commits = tracker.take_commits(|tp| ownership.generation(tp));
    if commits.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::new();
    for (tp, offset) in &commits {
        if let Err(e) = list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset))
        {
            tracing::warn!(error = %e, "cannot build the commit list");
        }
    }
    if let Err(e) = consumer.commit(&list, CommitMode::Async) {
        tracing::warn!(error = %e, "offset commit failed; the next commit covers these offsets");
    }
    InvalidatorStatus::add(&status.commits, 1);
}

/// Decodes one received message (or logs a consumer error: librdkafka retries those itself).
fn received(
    m: Result<rdkafka::message::BorrowedMessage<'_>, KafkaError>,
    formats: &HashMap<String, Format>,
    decoder: &Decoder,
    ownership: &Ownership,
) -> Option<Received> {
    let m = match m {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "Kafka consumer error (retried by librdkafka)");
            metrics::counter!(telemetry::KAFKA_ERRORS).increment(1);
            return None;
        }
    };
    let tp = Tp {
        topic: m.topic().to_owned(),
        partition: m.partition(),
    };
    let format = formats.get(&tp.topic).copied().unwrap_or(Format::Bus);
    let outcome = decoder.decode(format, m.key(), m.payload());
    let raw = outcome
        .is_err()
        .then(|| (m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec)));
    // Rebalance callbacks ran inside this recv: the generation is current.
    let generation = ownership.generation(&tp).unwrap_or(0);
    Some(Received {
        tp,
        generation,
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        outcome,
        raw,
    })
}

/// Applies one batch's evictions to Redis, retried until acknowledged (malformed records are
/// the dead-letter tasks' business). Returns `false` if `shutdown` completed first.
async fn apply(
    batch: &[Received],
    sink: &RedisSink,
    options: &RunOptions,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> bool {
    let status = Arc::clone(&options.status);
    let mut keys: Vec<(&str, Lsn)> = Vec::new();
    let mut tables: Vec<(&[String], Lsn)> = Vec::new();
    let mut commit_times = Vec::with_capacity(batch.len());
    let mut kafka_times = Vec::with_capacity(batch.len());
    let mut skipped = 0u64;
    // Control records in batch order (so in partition order): applied after the evictions.
    let mut controls: Vec<(&BusControl, i32)> = Vec::new();
    for r in batch {
        match &r.outcome {
            Ok(Decoded::Control(c)) => controls.push((c, r.tp.partition)),
            Ok(Decoded::Evict(e)) => {
                keys.extend(e.keys.iter().map(|k| (k.as_str(), e.lsn)));
                if !e.patterns.is_empty() {
                    tables.push((&e.patterns, e.lsn));
                }
                commit_times.push(e.commit_time_us);
                kafka_times.push(r.timestamp_ms);
            }
            Ok(Decoded::Skip(why)) => {
                tracing::debug!(topic = %r.tp.topic, partition = r.tp.partition, offset = r.offset, reason = %why, "nothing to evict");
                skipped += 1;
            }
            Err(reason) => {
                tracing::error!(topic = %r.tp.topic, partition = r.tp.partition, offset = r.offset, reason = %dlq::bounded_text(&reason.0, dlq::MAX_REASON_BYTES), "malformed record; sending it to the dead-letter topic");
            }
        }
    }
    // One eviction per key, at the highest LSN of the batch (the script keeps the max anyway).
    keys.sort_unstable_by(|a, b| a.0.cmp(b.0).then(b.1.cmp(&a.1)));
    keys.dedup_by(|later, first| later.0 == first.0);
    tables.sort_unstable_by(|a, b| a.0.cmp(b.0).then(b.1.cmp(&a.1)));
    tables.dedup_by(|later, first| later.0 == first.0);

    let redis = async {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut result = sink.invalidate(KeyIter(keys.iter())).await;
            if let Ok(mut n) = result {
                for (patterns, lsn) in &tables {
                    match sink.invalidate_matching(patterns, *lsn).await {
                        Ok(found) => n += found,
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                if result.is_ok() {
                    for (control, partition) in &controls {
                        if let Err(e) = apply_control(sink, control, *partition).await {
                            result = Err(e);
                            break;
                        }
                    }
                }
                // `redis.wait_replicas`: the batch counts only once enough replicas have it.
                if result.is_ok() {
                    result = sink.wait_for_replicas().await.map(|()| n);
                }
                if let Ok(n) = result {
                    return n;
                }
            }
            if let Err(e) = result {
                tracing::error!(error = %e, keys = keys.len(), retry_in_ms = backoff.as_millis() as u64, "Redis did not acknowledge the batch; retrying (nothing committed)");
                metrics::counter!(telemetry::REDIS_ERRORS).increment(1);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    };
    let evicted = tokio::select! {
        biased;
        () = shutdown.as_mut() => return false,
        n = redis => n,
    };
    let applied_at_us = now_us();
    if let Some(observer) = &options.observer {
        observer(&AppliedBatch {
            commit_times_us: &commit_times,
            kafka_times_ms: &kafka_times,
            applied_at_us,
            keys: keys.len(),
        });
    }
    let lag = metrics::histogram!(telemetry::COMMIT_TO_APPLIED_LAG);
    for t in &commit_times {
        lag.record((applied_at_us - t).max(0) as f64 / 1000.0);
    }
    let applied = commit_times.len() as u64;
    InvalidatorStatus::add(&status.records_applied, applied);
    InvalidatorStatus::add(&status.records_skipped, skipped);
    InvalidatorStatus::add(&status.keys_evicted, evicted);
    InvalidatorStatus::add(&status.batches, 1);
    metrics::counter!(telemetry::RECORDS, "outcome" => "applied").increment(applied);
    metrics::counter!(telemetry::RECORDS, "outcome" => "skipped").increment(skipped);
    metrics::counter!(telemetry::KEYS_EVICTED).increment(evicted);
    true
}

/// Applies one bus control record of `partition` (docs/architecture.md, "Watermark and epoch in
/// bus mode"): an epoch record opens the namespace's epoch (once per source start), a watermark
/// record moves the partition's progress and, once every partition reported, the namespace's
/// watermark.
async fn apply_control(
    sink: &RedisSink,
    control: &BusControl,
    partition: i32,
) -> Result<(), RedisSinkError> {
    match control {
        BusControl::Epoch {
            namespace,
            open,
            origin,
            gap,
            continuity,
        } => {
            let opened = sink
                .apply_bus_epoch(namespace, origin, gap.as_deref(), *continuity, *open)
                .await?;
            if let Some(reason) = &opened.bumped {
                metrics::counter!(telemetry::EPOCH_BUMPS, "reason" => reason.clone()).increment(1);
                tracing::warn!(%namespace, epoch = opened.epoch, reason, %origin, open,
                    "bumped the namespace's epoch (bus epoch record): every value cached before is a miss");
            }
        }
        BusControl::Watermark {
            namespace,
            open,
            origin,
            lsn,
            commit_time_us,
            lag_ms,
            partitions,
        } => {
            let record = BusWatermark {
                open: *open,
                origin,
                lsn: *lsn,
                commit_time_us: *commit_time_us,
                lag_ms: *lag_ms,
                partitions: *partitions,
            };
            let applied = sink
                .apply_bus_watermark(namespace, &record, partition)
                .await?;
            if let Some(reason) = &applied.bumped {
                metrics::counter!(telemetry::EPOCH_BUMPS, "reason" => reason.clone()).increment(1);
                tracing::warn!(%namespace, reason, open,
                    "the namespace's epoch was gone from Redis (restarted without it?); opened a new one");
            }
            let outcome = match applied.outcome {
                BusWatermarkOutcome::Written { lag_ms } => {
                    metrics::gauge!(telemetry::WATERMARK_LAG).set(lag_ms as f64);
                    "written"
                }
                BusWatermarkOutcome::Pending => "pending",
                BusWatermarkOutcome::EarlierOpen => "earlier_open",
            };
            metrics::counter!(telemetry::WATERMARKS, "outcome" => outcome).increment(1);
        }
    }
    Ok(())
}

/// The batch's keys for [`RedisSink::invalidate`]. (A named type rather than `iter().copied()`:
/// the adapter's higher-ranked lifetimes make the future non-`Send`.)
struct KeyIter<'k, 'a>(std::slice::Iter<'k, (&'a str, Lsn)>);

impl<'a> Iterator for KeyIter<'_, 'a> {
    type Item = (&'a str, Lsn);

    fn next(&mut self) -> Option<(&'a str, Lsn)> {
        self.0.next().copied()
    }
}
