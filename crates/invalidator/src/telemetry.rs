//! The metrics this crate emits, declared where they are emitted (README's Metrics table lists
//! them too; `crates/cli/tests/metrics.rs` checks both).

/// Counter, label `outcome` (`applied`, `skipped`, `dead_lettered`, `dead_letter_refused`,
/// `dropped_revoked`): records.
pub(crate) const RECORDS: &str = "cacheclear_invalidator_records_total";
/// Counter: cache keys invalidated (distinct per batch, plus keys found by table-wide evictions).
pub(crate) const KEYS_EVICTED: &str = "cacheclear_invalidator_keys_evicted_total";
/// Histogram (ms): a record's commit time → Redis's acknowledgement.
pub(crate) const COMMIT_TO_APPLIED_LAG: &str = "cacheclear_invalidator_commit_to_applied_lag_ms";
/// Counter: failed Redis batches (retried).
pub(crate) const REDIS_ERRORS: &str = "cacheclear_invalidator_redis_errors_total";
/// Counter, label `kind` (`transient`: retried; `permanent`: not retried): failed dead-letter
/// produces.
pub(crate) const DLQ_ERRORS: &str = "cacheclear_invalidator_dlq_errors_total";
/// Counter: malformed records dead-lettered as a bounded copy (refused whole for their size).
pub(crate) const DLQ_BOUNDED_COPIES: &str = "cacheclear_invalidator_dlq_bounded_copies_total";
/// Counter: offset commits the group coordinator refused.
pub(crate) const COMMIT_ERRORS: &str = "cacheclear_invalidator_commit_errors_total";
/// Counter: consumer errors reported by librdkafka.
pub(crate) const KAFKA_ERRORS: &str = "cacheclear_invalidator_kafka_errors_total";
/// Counter, label `kind` (`assign`, `revoke`): rebalance callbacks.
pub(crate) const REBALANCES: &str = "cacheclear_invalidator_rebalances_total";
/// Counter, label `reason`: Debezium events whose keys could not be computed, answered by
/// evicting their table whole: `unavailable_value` (the unavailable-value placeholder without an
/// old image), `no_before_image` (a delete, or an update of non-key template columns, without
/// `before`), `column_absent` (`before` lacks a template column: REPLICA IDENTITY DEFAULT),
/// `unsupported_type` (a schema type without a known PostgreSQL text form), `out_of_range`
/// (a date/timestamp outside PostgreSQL's range, such as an infinity sent as a number). Counted
/// when the record is decoded (a replay counts again).
pub(crate) const TABLE_FALLBACKS: &str = "cacheclear_invalidator_table_fallbacks_total";
/// Gauge: partitions this process owns.
pub(crate) const ASSIGNED_PARTITIONS: &str = "cacheclear_invalidator_assigned_partitions";
/// Counter, label `reason` (`new_slot`, `slot_lost`, `origin_changed`, `epoch_missing`): epoch
/// bumps this process applied from the bus's control records.
pub(crate) const EPOCH_BUMPS: &str = "cacheclear_invalidator_epoch_bumps_total";
/// Gauge (ms): lag carried by the last namespace watermark this process wrote (bus mode).
pub(crate) const WATERMARK_LAG: &str = "cacheclear_invalidator_watermark_lag_ms";
/// Counter, label `outcome` (`written`, `pending`, `earlier_open`): bus watermark records applied.
pub(crate) const WATERMARKS: &str = "cacheclear_invalidator_watermarks_total";

/// Describes every metric of the invalidator to the installed `metrics` recorder.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        RECORDS,
        "Records by outcome: applied (Redis acknowledged), skipped (nothing to evict), dead_lettered (malformed, acknowledged by the dead-letter topic), dead_letter_refused (malformed, refused permanently by the dead-letter topic even as a bounded copy: logged and skipped), dropped_revoked (partition revoked before commit)."
    );
    describe_counter!(
        KEYS_EVICTED,
        "Cache keys invalidated (distinct per batch, plus keys found by table-wide evictions)."
    );
    describe_histogram!(
        COMMIT_TO_APPLIED_LAG,
        Unit::Milliseconds,
        "From a record's commit time to Redis's acknowledgement of its evictions."
    );
    describe_counter!(
        REDIS_ERRORS,
        "Failed attempts to apply a batch to Redis (retried)."
    );
    describe_counter!(
        DLQ_ERRORS,
        "Failed dead-letter produces by kind: transient (retried), permanent (size, authorization, unknown topic, invalid record: not retried)."
    );
    describe_counter!(
        DLQ_BOUNDED_COPIES,
        "Malformed records dead-lettered as a bounded copy (first bytes, original size and SHA-256 in headers) because the whole record was refused for its size."
    );
    describe_counter!(
        COMMIT_ERRORS,
        "Offset commits the group coordinator refused."
    );
    describe_counter!(
        KAFKA_ERRORS,
        "Consumer errors reported by librdkafka (retried by it)."
    );
    describe_counter!(REBALANCES, "Rebalance callbacks by kind (assign, revoke).");
    describe_counter!(
        TABLE_FALLBACKS,
        "Debezium events answered by evicting their table whole because their keys could not be computed, by reason: unavailable_value, no_before_image, column_absent, unsupported_type, out_of_range."
    );
    describe_gauge!(ASSIGNED_PARTITIONS, "Partitions assigned to this process.");
    describe_counter!(
        EPOCH_BUMPS,
        "Namespace epoch bumps applied from the bus's control records, by reason (new_slot, slot_lost, origin_changed, epoch_missing)."
    );
    describe_gauge!(
        WATERMARK_LAG,
        Unit::Milliseconds,
        "Lag carried by the last namespace watermark written from the bus (max of the source's lag and Redis TIME minus the commit time)."
    );
    describe_counter!(
        WATERMARKS,
        "Bus watermark records applied, by outcome: written (the namespace's watermark moved), pending (another partition has not reported yet), earlier_open (a record of an earlier start of the source, ignored)."
    );
}

/// Exports every counter and gauge of the invalidator at zero (each label value listed in its
/// constant's doc), so that dashboards and alert rules see the series from the start instead of
/// only after their first event.
pub fn register_metrics() {
    for outcome in [
        "applied",
        "skipped",
        "dead_lettered",
        "dead_letter_refused",
        "dropped_revoked",
    ] {
        metrics::counter!(RECORDS, "outcome" => outcome).increment(0);
    }
    metrics::counter!(KEYS_EVICTED).increment(0);
    metrics::counter!(REDIS_ERRORS).increment(0);
    metrics::counter!(DLQ_BOUNDED_COPIES).increment(0);
    metrics::counter!(COMMIT_ERRORS).increment(0);
    metrics::counter!(KAFKA_ERRORS).increment(0);
    for kind in ["transient", "permanent"] {
        metrics::counter!(DLQ_ERRORS, "kind" => kind).increment(0);
    }
    for kind in ["assign", "revoke"] {
        metrics::counter!(REBALANCES, "kind" => kind).increment(0);
    }
    for reason in [
        "unavailable_value",
        "no_before_image",
        "column_absent",
        "unsupported_type",
        "out_of_range",
    ] {
        metrics::counter!(TABLE_FALLBACKS, "reason" => reason).increment(0);
    }
    metrics::gauge!(ASSIGNED_PARTITIONS).increment(0.0);
    for reason in ["new_slot", "slot_lost", "origin_changed", "epoch_missing"] {
        metrics::counter!(EPOCH_BUMPS, "reason" => reason).increment(0);
    }
    for outcome in ["written", "pending", "earlier_open"] {
        metrics::counter!(WATERMARKS, "outcome" => outcome).increment(0);
    }
    metrics::gauge!(WATERMARK_LAG).increment(0.0);
}
