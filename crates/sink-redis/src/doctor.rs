//! `cacheclear doctor`'s Redis checks: can evictions and fenced fills work on this Redis?

use std::time::Duration;

use cacheclear_protocol::Check;
use cacheclear_protocol::connect::{ConnectError, ConnectTimeouts, RedisConnection, RedisTarget};
use redis::aio::ConnectionManagerConfig;

use crate::RedisConfig;

/// How long one Redis round trip of a check may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Keys of our layout sampled by `redis.keys_without_ttl` (per node).
const TTL_SAMPLE: usize = 1000;

/// Runs every Redis check for `cfg`, in this order: `redis.connect`, `redis.version`,
/// `redis.maxmemory_policy`, `redis.maxmemory`, `redis.scripting`, `redis.cluster` (cluster
/// mode), `redis.keys_without_ttl`. In cluster mode the per-node checks run on every seed node in
/// `redis.urls` (list every master there to check them all). When no node answers, only
/// `redis.connect` is returned. Never fails itself: an error becomes a `fail` finding.
pub async fn diagnose(cfg: &RedisConfig) -> Vec<Check> {
    // Cluster: every seed node on its own (TLS and credentials as the sink uses them);
    // standalone and Sentinel: the sink's target (the sentinels name the master).
    let targets: Vec<RedisTarget> = if cfg.cluster {
        cfg.urls
            .iter()
            .map(|url| RedisTarget::url(url.clone()).with_tls(cfg.tls.clone()))
            .collect()
    } else {
        vec![cfg.target()]
    };
    let mut checks = Vec::new();
    let mut nodes = Vec::new();
    for target in &targets {
        let shown = target.display();
        match connect(target).await {
            Ok(conn) => {
                checks.push(Check::ok("redis.connect", format!("connected to {shown}")));
                nodes.push((shown, conn));
            }
            Err(e) => checks.push(Check::fail(
                "redis.connect",
                format!("cannot connect to {shown}: {e}"),
                "check redis.url / redis.urls / redis.sentinel (host, port, user, password; rediss:// and [redis.tls] for TLS) and that this host may reach Redis",
            )),
        }
    }
    for (url, conn) in &mut nodes {
        match node_checks(url, conn).await {
            Ok(found) => checks.extend(found),
            Err(e) => checks.push(Check::fail(
                "redis.version",
                format!("{url}: INFO failed: {e}"),
                "the user needs the INFO and EVAL commands (ACL: +info +eval +evalsha +scan +ttl)",
            )),
        }
    }
    if cfg.cluster
        && let Some((url, conn)) = nodes.first_mut()
    {
        checks.push(match cluster(conn).await {
            Ok(c) => c,
            Err(e) => Check::fail(
                "redis.cluster",
                format!("{url}: CLUSTER INFO failed: {e}"),
                "redis.cluster = true needs a Redis Cluster: set cluster = false for a standalone Redis",
            ),
        });
    }
    for (url, conn) in &mut nodes {
        checks.push(match keys_without_ttl(conn).await {
            Ok((sampled, without)) if without.is_empty() => Check::ok(
                "redis.keys_without_ttl",
                format!("{url}: {sampled} keys of cacheclear's layout sampled, each with a TTL"),
            ),
            Ok((sampled, without)) => Check::warn(
                "redis.keys_without_ttl",
                format!(
                    "{url}: {} of {sampled} sampled keys of cacheclear's layout have no TTL (e.g. {})",
                    without.len(),
                    without.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                ),
                "a value without a TTL stays until an invalidation reaches it: write values through the client library (it sets TTLs with jitter), never with a plain SET",
            ),
            Err(e) => Check::warn(
                "redis.keys_without_ttl",
                format!("{url}: SCAN failed: {e}"),
                "the user needs SCAN and TTL",
            ),
        });
    }
    checks
}

async fn connect(target: &RedisTarget) -> Result<RedisConnection, String> {
    let timeouts = ConnectTimeouts {
        connect: TIMEOUT,
        response: TIMEOUT,
    };
    let manager = ConnectionManagerConfig::new().set_number_of_retries(0);
    tokio::time::timeout(TIMEOUT * 2, target.connect(timeouts, manager))
        .await
        .map_err(|_| format!("no answer within {} s", (TIMEOUT * 2).as_secs()))?
        .map_err(|e| match e {
            ConnectError::Config(e) => e.to_string(),
            ConnectError::Redis(e) => cacheclear_protocol::connect::describe(&e),
        })
}

async fn query<T: redis::FromRedisValue>(
    conn: &mut RedisConnection,
    cmd: &redis::Cmd,
) -> Result<T, String> {
    tokio::time::timeout(TIMEOUT, cmd.query_async(conn))
        .await
        .map_err(|_| format!("no answer within {} s", TIMEOUT.as_secs()))?
        .map_err(|e| e.to_string())
}

/// `field:value` lines of an INFO reply.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

async fn node_checks(url: &str, conn: &mut RedisConnection) -> Result<Vec<Check>, String> {
    let mut out = Vec::new();
    let server: String = query(conn, redis::cmd("INFO").arg("server")).await?;
    let version = info_field(&server, "redis_version").unwrap_or("unknown");
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    out.push(if major >= 6 {
        Check::ok("redis.version", format!("{url}: Redis {version}"))
    } else {
        Check::fail(
            "redis.version",
            format!("{url}: Redis {version}"),
            "cacheclear needs Redis 6 or later (or a compatible server: Valkey, ElastiCache, MemoryDB)",
        )
    });
    let memory: String = query(conn, redis::cmd("INFO").arg("memory")).await?;
    let policy = info_field(&memory, "maxmemory_policy").unwrap_or("unknown");
    let maxmemory: u64 = info_field(&memory, "maxmemory")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let found = format!("{url}: maxmemory-policy = {policy}");
    out.push(match policy {
        "volatile-lfu" | "volatile-lru" => Check::ok("redis.maxmemory_policy", found),
        "noeviction" if maxmemory > 0 => Check::fail(
            "redis.maxmemory_policy",
            found,
            "with maxmemory set, noeviction refuses writes when full: fills fail and invalidation scripts may be refused (OOM). CONFIG SET maxmemory-policy volatile-lfu, then CONFIG REWRITE (or set it in redis.conf) so it survives a restart (ElastiCache/MemoryDB: the parameter group)",
        ),
        "noeviction" => Check::ok("redis.maxmemory_policy", format!("{found} (no maxmemory)")),
        p if p.starts_with("allkeys-") => Check::warn(
            "redis.maxmemory_policy",
            found,
            "allkeys-* can evict fences and leases under memory pressure, which weakens the protection of read-replica readers; prefer volatile-lfu (values, leases and fences all carry TTLs)",
        ),
        _ => Check::warn(
            "redis.maxmemory_policy",
            found,
            "prefer volatile-lfu or volatile-lru",
        ),
    });
    out.push(if maxmemory == 0 {
        Check::warn(
            "redis.maxmemory",
            format!("{url}: maxmemory is not set"),
            "set maxmemory (and maxmemory-policy volatile-lfu) so a full cache evicts cold values instead of exhausting the host",
        )
    } else {
        Check::ok(
            "redis.maxmemory",
            format!("{url}: maxmemory = {} MiB", maxmemory >> 20),
        )
    });
    out.push(
        match query::<i64>(conn, redis::cmd("EVAL").arg("return 1").arg(0)).await {
            Ok(1) => Check::ok("redis.scripting", format!("{url}: EVAL allowed")),
            Ok(other) => Check::fail(
                "redis.scripting",
                format!("{url}: EVAL answered {other}"),
                "cacheclear's invalidation and fill are Lua scripts: allow EVAL/EVALSHA",
            ),
            Err(e) => Check::fail(
                "redis.scripting",
                format!("{url}: EVAL refused: {e}"),
                "cacheclear's invalidation and fill are Lua scripts: allow EVAL/EVALSHA (ACL +eval +evalsha +script)",
            ),
        },
    );
    Ok(out)
}

async fn cluster(conn: &mut RedisConnection) -> Result<Check, String> {
    let info: String = query(conn, redis::cmd("CLUSTER").arg("INFO")).await?;
    let state = info_field(&info, "cluster_state").unwrap_or("unknown");
    let assigned: u32 = info_field(&info, "cluster_slots_assigned")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let nodes: String = query(conn, redis::cmd("CLUSTER").arg("NODES")).await?;
    let mut masters = Vec::new();
    let mut replicas_of = std::collections::HashMap::<String, usize>::new();
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(id), Some(flags), Some(master)) = (fields.first(), fields.get(2), fields.get(3))
        else {
            continue;
        };
        if flags.contains("fail") {
            continue;
        }
        if flags.contains("master") {
            masters.push((*id).to_owned());
        } else if flags.contains("slave") {
            *replicas_of.entry((*master).to_owned()).or_default() += 1;
        }
    }
    let min_replicas = masters
        .iter()
        .map(|m| replicas_of.get(m).copied().unwrap_or(0))
        .min()
        .unwrap_or(0);
    let found = format!(
        "cluster_state = {state}, {assigned} of 16384 slots assigned, {} masters, at least {min_replicas} replica(s) each",
        masters.len()
    );
    Ok(if state != "ok" || assigned < 16384 {
        Check::fail(
            "redis.cluster",
            found,
            "every slot must be served: CLUSTER ADDSLOTS / redis-cli --cluster fix",
        )
    } else if min_replicas == 0 {
        Check::warn(
            "redis.cluster",
            found,
            "a master without a replica loses its keys (and fences) when it fails; add replicas (redis-cli --cluster add-node --cluster-slave)",
        )
    } else {
        Check::ok("redis.cluster", found)
    })
}

/// Samples keys of cacheclear's layout (`{K}`, `{K}:lease`, `{K}:fence`; not the namespace keys,
/// whose epoch and origin keep no TTL by design) and returns how many were sampled and those
/// without a TTL.
async fn keys_without_ttl(conn: &mut RedisConnection) -> Result<(usize, Vec<String>), String> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = query(
            conn,
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("{*}*")
                .arg("COUNT")
                .arg(1000),
        )
        .await?;
        keys.extend(
            batch
                .into_iter()
                .filter(|k| !k.starts_with(cacheclear_protocol::namespace::NAMESPACE_KEY_PREFIX)),
        );
        cursor = next;
        if cursor == 0 || keys.len() >= TTL_SAMPLE {
            break;
        }
    }
    keys.truncate(TTL_SAMPLE);
    let mut pipe = redis::pipe();
    for k in &keys {
        pipe.cmd("PTTL").arg(k);
    }
    let ttls: Vec<i64> = if keys.is_empty() {
        Vec::new()
    } else {
        tokio::time::timeout(TIMEOUT, pipe.query_async(conn))
            .await
            .map_err(|_| format!("no answer within {} s", TIMEOUT.as_secs()))?
            .map_err(|e| e.to_string())?
    };
    let without = keys
        .iter()
        .zip(ttls)
        .filter(|(_, ttl)| *ttl == -1)
        .map(|(k, _)| k.clone())
        .collect();
    Ok((keys.len(), without))
}
