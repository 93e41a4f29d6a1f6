//! The metrics this crate emits, declared where they are emitted: each name is a constant used at
//! its emission site, and [`describe_metrics`] describes every one of them (README's Metrics
//! table lists them too; a test in `crates/cli/tests/metrics.rs` checks both).

/// Counter: cache keys evicted by row changes (acknowledged by the sink).
pub(crate) const INVALIDATIONS_APPLIED: &str = "cacheclear_invalidations_applied_total";
/// Counter: committed transactions whose evictions were acknowledged.
pub(crate) const TRANSACTIONS_APPLIED: &str = "cacheclear_transactions_applied_total";
/// Counter: partial parts of large transactions handed to the sink before their Commit was
/// read (a transaction reaching `max_batch_keys` keys while it streams). Registered at 0 when the
/// stream starts, so dashboards see it before the first large transaction.
pub(crate) const TRANSACTION_PARTS: &str = "cacheclear_transaction_parts_total";
/// Histogram (ms): commit time → the sink's acknowledgement.
pub(crate) const COMMIT_TO_APPLIED_LAG: &str = "cacheclear_commit_to_applied_lag_ms";
/// Histogram (ms), per batch: barrier taking it → every xid visible.
pub(crate) const VISIBILITY_BARRIER: &str = "cacheclear_visibility_barrier_ms";
/// Histogram (ms), per batch, label `sink`: first apply attempt → acknowledgement.
pub(crate) const SINK_APPLY: &str = "cacheclear_sink_apply_ms";
/// Gauge: flush LSN confirmed to PostgreSQL.
pub(crate) const CONFIRMED_LSN: &str = "cacheclear_confirmed_lsn";
/// Gauge (bytes): `pg_current_wal_lsn() - restart_lsn` of the slot.
pub(crate) const SLOT_RETAINED_WAL: &str = "cacheclear_slot_retained_wal_bytes";
/// Counter, label `sink`: failed attempts to apply a batch.
pub(crate) const SINK_ERRORS: &str = "cacheclear_sink_errors_total";
/// Counter, label `sink`: batches retried after a failed attempt.
pub(crate) const SINK_RETRIES: &str = "cacheclear_sink_retries_total";
/// Counter: snapshots re-taken while a committed xid was not yet visible.
pub(crate) const BARRIER_WAITS: &str = "cacheclear_barrier_waits_total";
/// Counter, label `reason` (`unrenderable_row`, `key_too_large`, `replica_identity`,
/// `publication_drift`): table-wide evictions made instead of a row's keys.
pub(crate) const TABLE_FALLBACKS: &str = "cacheclear_table_fallbacks_total";
/// Counter, labels `table` and `reason` (`not_published`, `table_replaced`, `table_missing`,
/// `replica_identity`, `partitions_changed`): rule tables the publication watch found drifted by a
/// migration.
pub(crate) const PUBLICATION_DRIFT: &str = "cacheclear_publication_drift_total";
/// Counter: invalidated slots (`wal_status = lost`) dropped and recreated
/// (`on_slot_lost = "flush_and_recreate"`).
pub(crate) const SLOT_LOST: &str = "cacheclear_slot_lost_total";
/// Counter, label `reason` (`new_slot`, `slot_lost`, `epoch_missing`, `origin_changed`): epoch
/// bumps of the namespace before the stream started.
pub(crate) const EPOCH_BUMPS: &str = "cacheclear_epoch_bumps_total";
/// Gauge (ms): end-to-end lag of the last watermark written (time since the heartbeat it carries
/// was emitted).
pub(crate) const WATERMARK_LAG: &str = "cacheclear_watermark_lag_ms";

/// Gauge, label `role` (`active`, `standby`): 1 for the role this process has now, 0 for the
/// other ("Active and standby" in docs/architecture.md).
pub(crate) const ROLE: &str = "cacheclear_source_role";

/// Sets [`ROLE`]: active (holds the slot lease) or standby (waits for it).
pub(crate) fn set_role(active: bool) {
    metrics::gauge!(ROLE, "role" => "active").set(if active { 1.0 } else { 0.0 });
    metrics::gauge!(ROLE, "role" => "standby").set(if active { 0.0 } else { 1.0 });
}

/// Describes every metric of the CDC source to the installed `metrics` recorder (call it after
/// installing one; without a recorder it does nothing).
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        INVALIDATIONS_APPLIED,
        "Cache keys evicted by row changes (acknowledged by the sink)."
    );
    describe_counter!(
        TRANSACTIONS_APPLIED,
        "Committed transactions whose evictions were acknowledged."
    );
    describe_counter!(
        TRANSACTION_PARTS,
        "Partial parts of large transactions handed to the sink while they still streamed (max_batch_keys keys each)."
    );
    describe_counter!(
        SLOT_LOST,
        "Invalidated slots (wal_status = lost) dropped and recreated after an epoch bump."
    );
    describe_counter!(
        EPOCH_BUMPS,
        "Epoch bumps of the namespace before streaming, by reason (new_slot, slot_lost, epoch_missing, origin_changed)."
    );
    describe_gauge!(
        WATERMARK_LAG,
        Unit::Milliseconds,
        "End-to-end lag carried by the last watermark written: time since its heartbeat was emitted."
    );
    describe_histogram!(
        COMMIT_TO_APPLIED_LAG,
        Unit::Milliseconds,
        "From a transaction's commit time to the sink's acknowledgement of its evictions."
    );
    describe_histogram!(
        VISIBILITY_BARRIER,
        Unit::Milliseconds,
        "Per batch: from the barrier taking it to every xid visible to a new snapshot (long while a commit waits for a synchronous standby)."
    );
    describe_histogram!(
        SINK_APPLY,
        Unit::Milliseconds,
        "Per batch: from the first apply attempt to the sink's acknowledgement, retries included."
    );
    describe_gauge!(
        CONFIRMED_LSN,
        "Flush LSN confirmed to PostgreSQL (as a number; exact below 2^53)."
    );
    describe_gauge!(
        SLOT_RETAINED_WAL,
        Unit::Bytes,
        "pg_current_wal_lsn() - restart_lsn of the slot: WAL the server keeps for us."
    );
    describe_counter!(
        SINK_ERRORS,
        "Failed attempts to apply a batch (Redis errors and timeouts, failed Kafka deliveries)."
    );
    describe_counter!(SINK_RETRIES, "Batches retried after a failed attempt.");
    describe_counter!(
        BARRIER_WAITS,
        "Snapshots re-taken because a committed xid was not yet visible."
    );
    describe_gauge!(
        ROLE,
        "1 for this process's role: active (holds the slot lease and streams) or standby (waits to take over); 0 for the other."
    );
    describe_counter!(
        TABLE_FALLBACKS,
        "Table-wide evictions made instead of a row's keys, by reason (unrenderable_row, key_too_large, replica_identity, publication_drift)."
    );
    describe_counter!(
        PUBLICATION_DRIFT,
        "Rule tables found drifted by a migration, by table and reason (not_published, table_replaced, table_missing, replica_identity, partitions_changed)."
    );
}

/// Exports every counter and gauge of the CDC source at zero, so that dashboards and alert rules
/// see the series from the start instead of only after their first event. `sink` is the label of
/// the configured sink (`redis` or `kafka`). Series labelled by table (the publication watch's
/// drift counter) appear with their first event: the tables are not known here.
pub fn register_metrics(sink: &'static str) {
    metrics::counter!(INVALIDATIONS_APPLIED).increment(0);
    metrics::counter!(TRANSACTIONS_APPLIED).increment(0);
    metrics::counter!(BARRIER_WAITS).increment(0);
    metrics::counter!(SINK_ERRORS, "sink" => sink).increment(0);
    metrics::counter!(SINK_RETRIES, "sink" => sink).increment(0);
    for reason in [
        crate::changes::FallbackReason::Unrenderable,
        crate::changes::FallbackReason::KeyTooLarge,
        crate::changes::FallbackReason::ReplicaIdentity,
        crate::changes::FallbackReason::PublicationDrift,
    ] {
        metrics::counter!(TABLE_FALLBACKS, "reason" => reason.label()).increment(0);
    }
    metrics::gauge!(CONFIRMED_LSN).increment(0.0);
    metrics::gauge!(SLOT_RETAINED_WAL).increment(0.0);
    for role in ["active", "standby"] {
        metrics::gauge!(ROLE, "role" => role).increment(0.0);
    }
}
