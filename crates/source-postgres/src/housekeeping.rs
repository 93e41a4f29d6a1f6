//! Housekeeping beside the stream: `pg_logical_emit_message` heartbeats (so an idle slot has
//! something to confirm and its retained WAL stays bounded) and the retained-WAL gauge.

use std::time::Duration;

use crate::PostgresConfig;
use crate::telemetry;

/// Heartbeats every `heartbeat_interval_ms` (none when 0) and the retained-WAL gauge every 5 s at
/// most, until the task is aborted. Failures are logged and retried on the next tick.
pub(crate) async fn run(pool: deadpool_postgres::Pool, cfg: PostgresConfig) {
    let heartbeat =
        (cfg.heartbeat_interval_ms > 0).then(|| Duration::from_millis(cfg.heartbeat_interval_ms));
    let mut tick = tokio::time::interval(
        heartbeat
            .unwrap_or(Duration::from_secs(5))
            .min(Duration::from_secs(5)),
    );
    let mut last_heartbeat = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let Ok(client) = pool.get().await else {
            continue;
        };
        if let Some(every) = heartbeat
            && last_heartbeat.elapsed() >= every
        {
            last_heartbeat = tokio::time::Instant::now();
            if let Err(e) = client
                .execute(
                    "SELECT pg_logical_emit_message(false, 'cacheclear.heartbeat', '')",
                    &[],
                )
                .await
            {
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
        match client
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&cfg.slot],
            )
            .await
        {
            Ok(Some(row)) => {
                if let Ok(Some(bytes)) = row.try_get::<_, Option<f64>>(0) {
                    metrics::gauge!(telemetry::SLOT_RETAINED_WAL).set(bytes);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "retained WAL query failed"),
        }
    }
}
