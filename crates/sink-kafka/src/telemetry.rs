//! The metrics this crate emits, declared where they are emitted (README's Metrics table lists
//! them too; `crates/cli/tests/metrics.rs` checks both).

/// Counter: bus records with a successful delivery report.
pub(crate) const RECORDS_DELIVERED: &str = "cacheclear_kafka_records_delivered_total";

/// Describes every metric of the Kafka sink to the installed `metrics` recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(
        RECORDS_DELIVERED,
        "Bus records the Kafka sink published and got a successful delivery report for."
    );
}

/// Exports the Kafka sink's counters at zero, so that dashboards and alert rules see the series
/// from the start instead of only after their first event.
pub fn register_metrics() {
    metrics::counter!(RECORDS_DELIVERED).increment(0);
}
