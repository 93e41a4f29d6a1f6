//! Redis Cluster mode of the sink: keys grouped by hash slot, calls grouped by master, retries
//! with a fresh slot map.
//!
//! One round: the keys of a window are sorted by slot; each slot's keys become script calls of
//! at most `keys_per_call` keys (one slot per call, so never `CROSSSLOT`); the calls are grouped by
//! the master that serves their slot according to our copy of `CLUSTER SLOTS`, and sent as
//! pipelines of at most `keys_per_call × calls_per_pipeline` keys, routed to that master
//! through the cluster client (which follows `MOVED`/`ASK` for the whole pipeline — the right
//! thing after a failover, where all of a master's slots move together). A pipeline counts as
//! done only when every call returned its key count; the calls of failed pipelines are
//! re-grouped with a freshly fetched slot map and re-sent (the script is idempotent), up to
//! `cluster_retries` times.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cacheclear_protocol::scripts::INVALIDATE_LUA;
use cacheclear_protocol::{KeyLayout, Lsn};
use futures::StreamExt;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{FromRedisValue, Value};

use crate::{RedisConfig, RedisSinkError};

/// Number of hash slots of a Redis Cluster.
const SLOTS: usize = 16384;
/// Marks a slot no master serves in [`SlotTable::owner`].
const UNSERVED: u16 = u16::MAX;
/// A slot map older than this is fetched again before the next batch (cheap: one round trip),
/// so resharding is picked up even when no request failed.
const SLOT_MAP_MAX_AGE: Duration = Duration::from_secs(30);

/// Who serves which slot, from `CLUSTER SLOTS`.
#[derive(Debug)]
pub(crate) struct SlotTable {
    /// Index into `masters` for each slot, [`UNSERVED`] when no master serves it.
    owner: Vec<u16>,
    /// `(host, port)` of each master that serves at least one slot.
    masters: Vec<(String, u16)>,
    fetched: Instant,
}

impl SlotTable {
    /// Parses a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, ...], replicas...], ...]`.
    /// An empty or wildcard host means "the node that answered" (the cluster client reads it the
    /// same way): `answering_host`; `?` (unknown endpoint) leaves the range unserved.
    fn parse(reply: Value, answering_host: &str) -> Result<SlotTable, String> {
        let Value::Array(ranges) = reply else {
            return Err(format!(
                "CLUSTER SLOTS replied {reply:?}, not a list of slot ranges"
            ));
        };
        let mut owner = vec![UNSERVED; SLOTS];
        let mut masters: Vec<(String, u16)> = Vec::new();
        for range in ranges {
            let Value::Array(items) = range else {
                return Err(format!("CLUSTER SLOTS: a slot range is {range:?}"));
            };
            let (start, end, master) = match items.as_slice() {
                [Value::Int(start), Value::Int(end), Value::Array(master), ..] => {
                    (*start, *end, master)
                }
                other => return Err(format!("CLUSTER SLOTS: unexpected slot range {other:?}")),
            };
            let (host, port) = match master.as_slice() {
                [Value::BulkString(host), Value::Int(port), ..] => (host, *port),
                other => return Err(format!("CLUSTER SLOTS: unexpected node {other:?}")),
            };
            let host = match String::from_utf8_lossy(host).as_ref() {
                "" | "0.0.0.0" | "::" => answering_host.to_owned(),
                "?" => continue,
                other => other.to_owned(),
            };
            let port = u16::try_from(port)
                .map_err(|_| format!("CLUSTER SLOTS: node port {port} out of range"))?;
            let (Ok(start), Ok(end)) = (usize::try_from(start), usize::try_from(end)) else {
                return Err(format!("CLUSTER SLOTS: slot range {start}-{end}"));
            };
            if start > end || end >= SLOTS {
                return Err(format!("CLUSTER SLOTS: slot range {start}-{end}"));
            }
            let index = match masters.iter().position(|m| m.0 == host && m.1 == port) {
                Some(i) => i,
                None => {
                    masters.push((host, port));
                    masters.len() - 1
                }
            };
            let index = u16::try_from(index)
                .map_err(|_| "CLUSTER SLOTS: more than 65535 masters".to_string())?;
            owner[start..=end].fill(index);
        }
        Ok(SlotTable {
            owner,
            masters,
            fetched: Instant::now(),
        })
    }

    fn owner(&self, slot: u16) -> Option<u16> {
        self.owner
            .get(usize::from(slot))
            .copied()
            .filter(|&o| o != UNSERVED)
    }
}

/// The cluster connection (opened on first use) and our copy of the slot map.
pub(crate) struct ClusterBackend {
    client: ClusterClient,
    /// Host of the first seed, for `CLUSTER SLOTS` entries without one.
    seed_host: String,
    conn: tokio::sync::OnceCell<ClusterConnection>,
    slots: Mutex<Option<Arc<SlotTable>>>,
}

/// One script call: keys `range` of the window, all of slot `slot`.
#[derive(Debug, Clone)]
struct Call {
    slot: u16,
    range: Range<usize>,
}

impl ClusterBackend {
    pub(crate) fn new(cfg: &RedisConfig) -> Result<ClusterBackend, RedisSinkError> {
        let timeout = Duration::from_millis(cfg.response_timeout_ms);
        let client = cacheclear_protocol::connect::cluster_client_builder(
            &cfg.urls,
            cfg.tls.as_ref(),
            "redis.urls",
            "redis.tls",
        )?
        .connection_timeout(timeout)
        .response_timeout(timeout)
        // A few quick retries inside the client (redirects, reconnects); longer outages
        // are handled by our rounds with a fresh slot map.
        .retries(4)
        .min_retry_wait(20)
        .max_retry_wait(500)
        .retry_wait_formula(20, 2)
        .build()?;
        let seed_host = cfg
            .urls
            .first()
            .and_then(|url| redis::IntoConnectionInfo::into_connection_info(url.as_str()).ok())
            .and_then(|info| match info.addr() {
                redis::ConnectionAddr::Tcp(host, _) => Some(host.clone()),
                redis::ConnectionAddr::TcpTls { host, .. } => Some(host.clone()),
                _ => None,
            })
            .unwrap_or_default();
        Ok(ClusterBackend {
            client,
            seed_host,
            conn: tokio::sync::OnceCell::new(),
            slots: Mutex::new(None),
        })
    }

    /// The cluster connection, connecting on first use (a failed attempt is retried on the next
    /// call: the cluster may be down when the sink starts).
    pub(crate) async fn connection(&self) -> Result<ClusterConnection, RedisSinkError> {
        self.conn().await
    }

    async fn conn(&self) -> Result<ClusterConnection, RedisSinkError> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
            .map_err(RedisSinkError::from)
    }

    /// Our slot map; fetched when missing, older than [`SLOT_MAP_MAX_AGE`], or `refresh`.
    pub(crate) async fn slot_table(
        &self,
        refresh: bool,
        timeout: Duration,
    ) -> Result<Arc<SlotTable>, RedisSinkError> {
        if !refresh {
            let cached = self.slots.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(table) = cached.filter(|t| t.fetched.elapsed() < SLOT_MAP_MAX_AGE) {
                return Ok(table);
            }
        }
        let mut conn = self.conn().await?;
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SLOTS");
        let reply = tokio::time::timeout(
            timeout,
            // Any node knows the whole map. A node only reports an empty host for itself
            // before it ever met another node, i.e. in a one-node cluster: its seed's host.
            conn.route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random)),
        )
        .await
        .map_err(|_| RedisSinkError::Timeout(timeout.as_millis() as u64))??;
        let table =
            Arc::new(SlotTable::parse(reply, &self.seed_host).map_err(RedisSinkError::Cluster)?);
        *self.slots.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&table));
        Ok(table)
    }

    /// Invalidates `keys` (each with its fence LSN). Returns the number acknowledged.
    pub(crate) async fn invalidate<'a>(
        &self,
        cfg: &RedisConfig,
        sha: &str,
        keys: impl IntoIterator<Item = (&'a str, Lsn)>,
    ) -> Result<u64, RedisSinkError> {
        let per_pipeline = cfg.keys_per_call.saturating_mul(cfg.calls_per_pipeline);
        // Keys are grouped by slot within windows of this many keys, so memory stays bounded
        // however many keys the batch holds (about 32 bytes per key of the window).
        let window = per_pipeline
            .saturating_mul(cfg.pipelines_in_flight)
            .saturating_mul(4);
        let mut keys = keys.into_iter().peekable();
        let mut buf: Vec<(u16, &str, Lsn)> = Vec::new();
        let mut total = 0u64;
        while keys.peek().is_some() {
            buf.clear();
            for (key, lsn) in keys.by_ref().take(window) {
                buf.push((KeyLayout::new(key)?.slot(), key, lsn));
            }
            buf.sort_unstable_by_key(|e| e.0);
            total += self.invalidate_window(cfg, sha, &buf).await?;
        }
        Ok(total)
    }

    /// One window of keys sorted by slot: rounds until every call is acknowledged.
    async fn invalidate_window(
        &self,
        cfg: &RedisConfig,
        sha: &str,
        keys: &[(u16, &str, Lsn)],
    ) -> Result<u64, RedisSinkError> {
        let timeout = Duration::from_millis(cfg.response_timeout_ms);
        // Calls: runs of one slot, at most keys_per_call keys each.
        let mut pending: Vec<Call> = Vec::new();
        let mut start = 0;
        while start < keys.len() {
            let slot = keys[start].0;
            let mut end = start;
            while end < keys.len() && keys[end].0 == slot && end - start < cfg.keys_per_call {
                end += 1;
            }
            pending.push(Call {
                slot,
                range: start..end,
            });
            start = end;
        }
        let mut acked = 0u64;
        let mut round = 0u32;
        loop {
            let outcome = self
                .round(cfg, sha, keys, &pending, round > 0, timeout)
                .await;
            let last_error = match outcome {
                Ok((n, failed, last_error)) => {
                    acked += n;
                    pending = failed;
                    match last_error {
                        None => return Ok(acked),
                        Some(e) => e,
                    }
                }
                // The slot map could not be fetched: nothing was sent.
                Err(e) => e,
            };
            // Refused credentials or certificates: another round cannot help.
            if last_error.is_fatal() {
                return Err(last_error);
            }
            let unacked: usize = pending.iter().map(|c| c.range.len()).sum();
            if round >= cfg.cluster_retries {
                return Err(RedisSinkError::Cluster(format!(
                    "{unacked} of {} keys were not acknowledged after {} retries with a fresh \
                     slot map (redis.cluster_retries); last error: {last_error}",
                    keys.len(),
                    cfg.cluster_retries
                )));
            }
            let pause = Duration::from_millis(50u64 << round.min(5)).min(Duration::from_secs(1));
            tracing::warn!(
                keys = unacked,
                round = round + 1,
                retries = cfg.cluster_retries,
                error = %last_error,
                "Redis Cluster: some keys were not acknowledged; retrying them with a fresh slot map"
            );
            metrics::counter!(crate::telemetry::CLUSTER_RETRIES).increment(1);
            tokio::time::sleep(pause).await;
            round += 1;
        }
    }

    /// Sends every call once. Returns the keys acknowledged, the calls to retry, and the last
    /// error (`None` when everything was acknowledged).
    async fn round(
        &self,
        cfg: &RedisConfig,
        sha: &str,
        keys: &[(u16, &str, Lsn)],
        calls: &[Call],
        refresh: bool,
        timeout: Duration,
    ) -> Result<(u64, Vec<Call>, Option<RedisSinkError>), RedisSinkError> {
        let table = self.slot_table(refresh, timeout).await?;
        let conn = self.conn().await?;
        let mut failed = Vec::new();
        let mut last_error = None;
        // Group by master; calls of unserved slots wait for the next round.
        let mut per_master: HashMap<u16, Vec<Call>> = HashMap::new();
        for call in calls {
            match table.owner(call.slot) {
                Some(master) => per_master.entry(master).or_default().push(call.clone()),
                None => {
                    failed.push(call.clone());
                    last_error = Some(RedisSinkError::Cluster(format!(
                        "no master serves slot {} (CLUSTER SLOTS); the cluster may be failing \
                         over or missing a node",
                        call.slot
                    )));
                }
            }
        }
        let per_pipeline = cfg.keys_per_call.saturating_mul(cfg.calls_per_pipeline);
        let mut pipelines: Vec<Vec<Call>> = Vec::new();
        for (_, calls) in per_master {
            let mut current: Vec<Call> = Vec::new();
            let mut current_keys = 0;
            for call in calls {
                if current_keys + call.range.len() > per_pipeline && !current.is_empty() {
                    pipelines.push(std::mem::take(&mut current));
                    current_keys = 0;
                }
                current_keys += call.range.len();
                current.push(call);
            }
            if !current.is_empty() {
                pipelines.push(current);
            }
        }
        let in_flight = cfg
            .pipelines_in_flight
            .saturating_mul(table.masters.len().max(1));
        let mut results = futures::stream::iter(pipelines.into_iter().map(|calls| {
            let mut conn = conn.clone();
            async move {
                let result = send(&mut conn, cfg, sha, keys, &calls, timeout).await;
                (calls, result)
            }
        }))
        .buffer_unordered(in_flight);
        let mut acked = 0u64;
        while let Some((calls, result)) = results.next().await {
            match result {
                Ok(n) => acked += n,
                Err(e) => {
                    failed.extend(calls);
                    last_error = Some(e);
                }
            }
        }
        Ok((acked, failed, last_error))
    }

    /// Invalidates every key matching one of `patterns` on every master (SCAN is per node),
    /// with fence `lsn`. Returns the number of distinct cache keys found per page, summed.
    pub(crate) async fn invalidate_matching(
        &self,
        cfg: &RedisConfig,
        sha: &str,
        patterns: &[String],
        lsn: Lsn,
    ) -> Result<u64, RedisSinkError> {
        let timeout = Duration::from_millis(cfg.response_timeout_ms);
        let mut total = 0u64;
        for pattern in patterns {
            // Masters fully scanned for this pattern. After a failover the promoted replica
            // holds the same keys as the master it replaced, so scanning it is as good.
            let mut done: Vec<(String, u16)> = Vec::new();
            let mut round = 0u32;
            loop {
                let table = self.slot_table(true, timeout).await;
                let mut error: Option<(String, RedisSinkError)> = None;
                match table {
                    Ok(table) => {
                        for master in &table.masters {
                            if done.contains(master) {
                                continue;
                            }
                            match self
                                .scan_node(cfg, sha, master, pattern, lsn, timeout)
                                .await
                            {
                                Ok(n) => {
                                    total += n;
                                    done.push(master.clone());
                                }
                                Err(e) => {
                                    error = Some((format!("{}:{}", master.0, master.1), e));
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => error = Some(("the cluster (CLUSTER SLOTS)".into(), e)),
                }
                let Some((node, error)) = error else { break };
                if error.is_fatal() {
                    return Err(error);
                }
                if round >= cfg.cluster_retries {
                    return Err(RedisSinkError::Cluster(format!(
                        "SCAN MATCH {pattern} of {node} failed after {} retries with a fresh \
                         slot map (redis.cluster_retries): {error}",
                        cfg.cluster_retries
                    )));
                }
                tracing::warn!(%error, %node, pattern, round = round + 1, "Redis Cluster: SCAN of a master failed; retrying with a fresh slot map");
                tokio::time::sleep(
                    Duration::from_millis(50u64 << round.min(5)).min(Duration::from_secs(1)),
                )
                .await;
                round += 1;
            }
        }
        Ok(total)
    }

    /// SCANs one node from cursor 0 to the end, invalidating each page's cache keys.
    async fn scan_node(
        &self,
        cfg: &RedisConfig,
        sha: &str,
        (host, port): &(String, u16),
        pattern: &str,
        lsn: Lsn,
        timeout: Duration,
    ) -> Result<u64, RedisSinkError> {
        let mut conn = self.conn().await?;
        let mut cursor: u64 = 0;
        let mut total = 0u64;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(cfg.scan_count);
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            });
            let reply = tokio::time::timeout(timeout, conn.route_command(cmd, route))
                .await
                .map_err(|_| RedisSinkError::Timeout(cfg.response_timeout_ms))??;
            let (next, found) = <(u64, Vec<String>)>::from_redis_value(reply)
                .map_err(|e| RedisSinkError::Redis(e.into()))?;
            let mut keys: Vec<(&str, Lsn)> = found
                .iter()
                .filter_map(|k| Some((crate::cache_key_of(k)?, lsn)))
                .collect();
            keys.sort_unstable();
            keys.dedup();
            total += self.invalidate(cfg, sha, keys).await?;
            if next == 0 {
                return Ok(total);
            }
            cursor = next;
        }
    }
}

/// Sends one pipeline (`SCRIPT LOAD`, then one `EVALSHA` per call) to the master of the first
/// call's slot; `Ok(keys)` only when every call acknowledged exactly its keys.
async fn send(
    conn: &mut ClusterConnection,
    cfg: &RedisConfig,
    sha: &str,
    keys: &[(u16, &str, Lsn)],
    calls: &[Call],
    timeout: Duration,
) -> Result<u64, RedisSinkError> {
    let Some(first) = calls.first() else {
        return Ok(0);
    };
    let mut pipe = redis::pipe();
    // Loading first makes the EVALSHAs immune to NOSCRIPT (a promoted replica, a restart).
    pipe.cmd("SCRIPT").arg("LOAD").arg(INVALIDATE_LUA);
    let mut sent = 0usize;
    for call in calls {
        let call_keys = &keys[call.range.clone()];
        let cmd = pipe.cmd("EVALSHA").arg(sha).arg(call_keys.len() * 3);
        for (_, key, _) in call_keys {
            let layout = KeyLayout::new(key)?;
            cmd.arg(layout.value())
                .arg(layout.lease())
                .arg(layout.fence());
        }
        cmd.arg(cfg.fence_ttl_ms);
        crate::lsn_args(cmd, call_keys.iter().map(|&(_, _, lsn)| lsn));
        sent += call_keys.len();
    }
    let commands = calls.len() + 1;
    let route = SingleNodeRoutingInfo::SpecificNode(Route::new(first.slot, SlotAddr::Master));
    let replies = tokio::time::timeout(timeout, conn.route_pipeline(pipe, 0, commands, route))
        .await
        .map_err(|_| RedisSinkError::Timeout(cfg.response_timeout_ms))??;
    if replies.len() != commands {
        return Err(RedisSinkError::Cluster(format!(
            "a pipeline of {commands} commands got {} replies",
            replies.len()
        )));
    }
    let mut acked = 0i64;
    for (reply, call) in replies.into_iter().skip(1).zip(calls) {
        match reply {
            Value::Int(n) if n == call.range.len() as i64 => acked += n,
            Value::Int(n) => {
                return Err(RedisSinkError::ShortAck {
                    sent: call.range.len(),
                    acked: n,
                });
            }
            other => {
                other.extract_error()?;
                return Err(RedisSinkError::Cluster(format!(
                    "the invalidation script of slot {} returned a non-integer reply",
                    call.slot
                )));
            }
        }
    }
    if acked != sent as i64 {
        return Err(RedisSinkError::ShortAck { sent, acked });
    }
    Ok(sent as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn slot_table_parses_cluster_slots() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000),
                node("127.0.0.1", 7003),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node("127.0.0.1", 7001),
            ]),
        ]);
        let table = SlotTable::parse(reply, "seed").expect("parses");
        assert_eq!(table.masters.len(), 2);
        assert_eq!(table.owner(0), Some(0));
        assert_eq!(table.owner(5460), Some(0));
        assert_eq!(table.owner(5461), Some(1));
        assert_eq!(table.owner(16383), Some(1));
        assert_eq!(table.masters[1], ("127.0.0.1".to_string(), 7001));
    }

    #[test]
    fn slot_table_leaves_gaps_unserved_and_refuses_garbage() {
        let reply = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(99),
            node("h", 1),
        ])]);
        let table = SlotTable::parse(reply, "seed").expect("parses");
        assert_eq!(table.owner(100), None);
        for bad in [
            Value::Nil,
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(5),
                Value::Int(16384),
                node("h", 1),
            ])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(1),
                node("h", 70000),
            ])]),
        ] {
            assert!(SlotTable::parse(bad.clone(), "seed").is_err(), "{bad:?}");
        }
    }
}
