//! The bus floor of `bench kafka`: the broker's own produce → consume round trip, with the
//! client settings of the pipeline's two ends and nothing else: a librdkafka producer (the
//! `rdkafka` crate) with the Kafka sink's properties (`KafkaConfig::producer_properties`:
//! `linger.ms`, `acks = all`, idempotence, Nagle off) and a `StreamConsumer` with the
//! invalidator's (`cacheclear_invalidator::consumer_config`, the bench's `fetch.wait.max.ms`
//! included), on a topic of as many partitions as the bench's, at one record per ms (1k
//! records/s, each its own key: spread over the partitions as the source's are). Each record
//! carries its send time (µs since the Unix epoch, this machine's clock); the consumer records
//! receive time − send time. No PostgreSQL, no rules, no Redis.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cacheclear_invalidator::{KafkaConfig, now_us};
use hdrhistogram::Histogram;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::on_own_runtime;

/// The floor's figures, ms.
pub(super) struct BusFloor {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Records received in the measured phase.
    pub records: u64,
}

/// What the consumer saw.
struct Seen {
    lag_us: Histogram<u64>,
    recording: bool,
    /// Records received (warm-up included).
    received: u64,
}

/// Produces 1k records/s for `seconds` to `topic` (which must exist) with `producer_properties`
/// and consumes them with `consumer` (its `topics` replaced by `topic`, its group by one of its
/// own), after a warm-up that waits until a record has gone round.
///
/// # Errors
/// A client could not be created, a record could not be queued, nothing went round within 60 s,
/// or nothing was received in the measured phase.
pub(super) async fn measure(
    topic: &str,
    producer_properties: &std::collections::BTreeMap<String, String>,
    consumer: &KafkaConfig,
    seconds: u64,
) -> anyhow::Result<BusFloor> {
    let mut pc = ClientConfig::new();
    for (k, v) in producer_properties {
        pc.set(k, v);
    }
    let producer: FutureProducer = pc.create().context("bus floor producer")?;
    let mut kafka = consumer.clone();
    kafka.group_id = "cacheclear-bench-bus-floor".into();
    kafka.topics = vec![topic.to_string()];
    let seen = Arc::new(Mutex::new(Seen {
        lag_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)?,
        recording: false,
        received: 0,
    }));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // On a runtime of its own, as the invalidator's consumer is.
    let task = on_own_runtime({
        let seen = Arc::clone(&seen);
        let topic = topic.to_string();
        move || async move {
            let consumer: StreamConsumer = cacheclear_invalidator::consumer_config(&kafka)
                .create()
                .context("bus floor consumer")?;
            consumer.subscribe(&[&topic])?;
            tokio::pin!(stop_rx);
            loop {
                let msg = tokio::select! {
                    m = consumer.recv() => m?,
                    _ = &mut stop_rx => return Ok(()),
                };
                let now = now_us();
                let Some(sent) = msg
                    .payload()
                    .and_then(|p| <[u8; 8]>::try_from(p).ok())
                    .map(i64::from_le_bytes)
                else {
                    continue;
                };
                let Ok(mut s) = seen.lock() else {
                    bail!("bus floor: poisoned")
                };
                s.received += 1;
                if s.recording {
                    let _ = s.lag_us.record((now - sent).max(1) as u64);
                }
            }
        }
    });
    let send = |i: u64| -> anyhow::Result<_> {
        let key = format!("bench:floor:{i}");
        let payload = now_us().to_le_bytes();
        producer
            .send_result(
                FutureRecord::<str, [u8]>::to(topic)
                    .key(key.as_str())
                    .payload(&payload[..]),
            )
            .map_err(|(e, _)| anyhow::anyhow!("bus floor: queueing a record: {e}"))
    };
    // Warm-up: one record every 10 ms until one goes round (the group's join and assignment).
    let started = Instant::now();
    let mut i = 0u64;
    let mut pending = Vec::new();
    while seen.lock().map(|s| s.received).unwrap_or(0) == 0 {
        if task.is_finished() {
            bail!("bus floor: the consumer stopped: {:?}", task.await);
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("bus floor: no record went round within 60 s");
        }
        pending.push(send(i)?);
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the warm-up's records drain, then measure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Ok(mut s) = seen.lock() {
        s.recording = true;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        tick.tick().await;
        // Delivery reports are awaited at the end: the send loop never waits for an ack.
        pending.push(send(i)?);
        i += 1;
    }
    for d in pending.drain(..) {
        d.await
            .context("bus floor: delivery report")?
            .map_err(|(e, _)| anyhow::anyhow!("bus floor: producing: {e}"))?;
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let _ = stop_tx.send(());
    task.await??;
    let s = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("bus floor: poisoned"))?;
    if s.lag_us.is_empty() {
        bail!("bus floor: nothing received in the measured phase");
    }
    let ms = |q: f64| s.lag_us.value_at_quantile(q) as f64 / 1000.0;
    Ok(BusFloor {
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        max_ms: s.lag_us.max() as f64 / 1000.0,
        records: s.lag_us.len(),
    })
}
