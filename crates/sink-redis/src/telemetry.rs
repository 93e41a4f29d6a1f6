//! The metrics this crate emits, declared where they are emitted (README's Metrics table lists
//! them too; `crates/cli/tests/metrics.rs` checks both).

/// Counter: cache keys re-sent with a fresh slot map after `MOVED`/`ASK`/`CLUSTERDOWN` (Redis
/// Cluster).
pub(crate) const CLUSTER_RETRIES: &str = "cacheclear_redis_cluster_retries_total";

/// Describes every metric of the Redis sink to the installed `metrics` recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(
        CLUSTER_RETRIES,
        "Cache keys re-sent to Redis Cluster with a fresh slot map (MOVED, ASK, failover)."
    );
}

/// Exports the Redis sink's counters at zero, so that dashboards and alert rules see the series
/// from the start instead of only after their first event.
pub fn register_metrics() {
    metrics::counter!(CLUSTER_RETRIES).increment(0);
}
