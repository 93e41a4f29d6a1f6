//! The publication watch: keeps every rule table streamed through schema migrations.
//!
//! Migrations move tables under a running pipeline without a word in the replication stream:
//! a table swap (`ALTER TABLE item RENAME TO item_old; ALTER TABLE item_new RENAME TO item`, the
//! pattern of pg-osc and pgroll-style tools) leaves the publication publishing the old table's
//! OID; a `DROP` + `CREATE` (`pg_restore --clean`) takes the table out of the publication; an
//! `ALTER TABLE … REPLICA IDENTITY DEFAULT` stops old rows from carrying a rule's columns. Changes
//! to the new table are then never streamed, and its cached values stay.
//!
//! Every `postgres.publication_check_interval_ms`, and whenever a `Relation` message arrives, the
//! watch runs one catalog query ([`catalog::inspect_rule_tables`]) and compares each rule table's
//! OID, publication membership and replica identity with what it saw last:
//!
//! | found | done |
//! |---|---|
//! | not published (swap, drop + create), publication ours (`create_publication`) | `ALTER PUBLICATION … ADD TABLE`, then a table-wide eviction |
//! | not published, publication the user's | error with the fix, counted; `on_publication_drift = "evict"`: a table-wide eviction on every check; `"stop"`: the pipeline stops |
//! | another OID under the name, still published (`FOR TABLES IN SCHEMA`, `FOR ALL TABLES`) | a table-wide eviction (the old table's rows were dropped without DELETEs) |
//! | no table of that name (renamed away, dropped) | error, counted, one table-wide eviction |
//! | replica identity no longer carries a rule column | error with the `REPLICA IDENTITY FULL` fix, counted; the mapper evicts the table on each UPDATE/DELETE meanwhile |
//! | a partitioned rule table's partitions changed (ATTACH, DETACH, CREATE … PARTITION OF, DROP) | a table-wide eviction (attached rows arrive without change events; detached ones leave without DELETEs) |
//!
//! The eviction is requested through the WAL ([`catalog::request_table_eviction`]) after the
//! table is published again, so it is applied in commit order after every change that was not
//! streamed, and whatever was cached in the window is gone once it lands.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cacheclear_protocol::ConfigError;
use cacheclear_rules::Rules;
use tokio::sync::Notify;

use crate::catalog::{self, RuleTable};
use crate::config::DriftPolicy;
use crate::{PostgresConfig, SourceError, telemetry};

/// How often an ongoing drift's error repeats in the log.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Checks triggered by `Relation` messages are at least this far apart.
const MIN_GAP: Duration = Duration::from_millis(200);

/// Why a rule table drifted: the `reason` label of `cacheclear_publication_drift_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drift {
    NotPublished,
    Replaced,
    Missing,
    ReplicaIdentity,
    Partitions,
}

impl Drift {
    fn label(self) -> &'static str {
        match self {
            Drift::NotPublished => "not_published",
            Drift::Replaced => "table_replaced",
            Drift::Missing => "table_missing",
            Drift::ReplicaIdentity => "replica_identity",
            Drift::Partitions => "partitions_changed",
        }
    }
}

/// What the watch last knew of one rule table.
struct Known {
    found: RuleTable,
    /// Drifts logged, with when (bounded-rate logging while one lasts).
    logged: Vec<(Drift, Instant)>,
}

impl Known {
    /// True when `drift` should be logged now (first time, or `LOG_EVERY` since).
    fn should_log(&mut self, drift: Drift) -> bool {
        match self.logged.iter_mut().find(|(d, _)| *d == drift) {
            Some((_, at)) if at.elapsed() < LOG_EVERY => false,
            Some((_, at)) => {
                *at = Instant::now();
                true
            }
            None => {
                self.logged.push((drift, Instant::now()));
                true
            }
        }
    }

    fn clear(&mut self, drift: Drift) -> bool {
        let before = self.logged.len();
        self.logged.retain(|(d, _)| *d != drift);
        before != self.logged.len()
    }
}

/// Runs the publication watch until it is aborted, or returns the error that stops the pipeline
/// (`on_publication_drift = "stop"`). Query failures are logged and retried on the next check.
pub(crate) async fn watch(
    pool: deadpool_postgres::Pool,
    cfg: PostgresConfig,
    rules: Arc<Rules>,
    initial: Vec<RuleTable>,
    trigger: Arc<Notify>,
) -> SourceError {
    let mut known: Vec<Known> = initial
        .into_iter()
        .map(|found| Known {
            found,
            logged: Vec::new(),
        })
        .collect();
    let every = (cfg.publication_check_interval_ms > 0)
        .then(|| Duration::from_millis(cfg.publication_check_interval_ms));
    loop {
        match every {
            Some(every) => {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = trigger.notified() => tokio::time::sleep(MIN_GAP).await,
                }
            }
            None => {
                trigger.notified().await;
                tokio::time::sleep(MIN_GAP).await;
            }
        }
        match check(&pool, &cfg, &rules, &mut known).await {
            Ok(()) => {}
            Err(Stop(e)) => return e,
        }
    }
}

/// The error that stops the pipeline.
struct Stop(SourceError);

async fn check(
    pool: &deadpool_postgres::Pool,
    cfg: &PostgresConfig,
    rules: &Rules,
    known: &mut [Known],
) -> Result<(), Stop> {
    let client = match pool.get().await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "publication watch: no connection; retrying at the next check");
            return Ok(());
        }
    };
    let found = match catalog::inspect_rule_tables(&client, rules, &cfg.publication).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "publication watch: catalog query failed; retrying at the next check");
            return Ok(());
        }
    };
    for ((table, now), known) in rules.tables().zip(found).zip(known.iter_mut()) {
        let qualified = table.qualified();
        let quoted = format!(
            "{}.{}",
            catalog::quote_ident(table.schema()),
            catalog::quote_ident(table.name())
        );
        let mut evict = false;
        match now.oid {
            None => {
                if known.found.oid.is_some() {
                    // Renamed away or dropped, with nothing in its place: its rows' changes no
                    // longer reach any rule. Evict what is cached once.
                    evict = true;
                    count(qualified, Drift::Missing);
                }
                if known.should_log(Drift::Missing) {
                    tracing::error!(
                        table = qualified,
                        "rule table no longer exists under this name (renamed or dropped); its \
                         keys were evicted and nothing more is streamed for it until a table of \
                         that name exists again (rename it back, or change the rule)"
                    );
                }
            }
            Some(oid) => {
                if known.clear(Drift::Missing) {
                    tracing::info!(table = qualified, "rule table exists again");
                }
                if known.found.oid.is_some_and(|was| was != oid) || known.found.oid.is_none() {
                    // Re-created or swapped: the old table's rows left without DELETEs.
                    tracing::warn!(
                        table = qualified, oid, was = ?known.found.oid,
                        "rule table was replaced (swap, or drop and re-create); evicting its keys"
                    );
                    count(qualified, Drift::Replaced);
                    evict = true;
                }
                if known.found.oid == Some(oid)
                    && partition_names(&known.found) != partition_names(&now)
                {
                    // ATTACH brings rows no change event announced (a cached "not found" or list
                    // is now wrong); DETACH takes rows out without DELETEs.
                    tracing::warn!(
                        table = qualified, was = ?partition_names(&known.found), now = ?partition_names(&now),
                        "the rule table's partitions changed (attached, detached, created or dropped); evicting its keys"
                    );
                    count(qualified, Drift::Partitions);
                    evict = true;
                }
                if !now.published {
                    count(qualified, Drift::NotPublished);
                    if cfg.create_publication {
                        match catalog::republish(&client, &cfg.publication, &quoted).await {
                            Ok(()) => {
                                tracing::warn!(
                                    table = qualified, publication = %cfg.publication,
                                    "rule table had left the publication: added it back; evicting its keys"
                                );
                                known.clear(Drift::NotPublished);
                            }
                            Err(e) => {
                                if known.should_log(Drift::NotPublished) {
                                    tracing::error!(
                                        table = qualified, publication = %cfg.publication, error = %e,
                                        "rule table is not published and could not be added back; fix with: ALTER PUBLICATION {} ADD TABLE {quoted};",
                                        catalog::quote_ident(&cfg.publication)
                                    );
                                }
                            }
                        }
                        evict = true;
                    } else {
                        let fix = format!(
                            "ALTER PUBLICATION {} ADD TABLE {quoted};",
                            catalog::quote_ident(&cfg.publication)
                        );
                        if cfg.on_publication_drift == DriftPolicy::Stop {
                            return Err(Stop(
                                ConfigError::new(
                                    "postgres.publication",
                                    format!(
                                        "rule table `{qualified}` is no longer published by `{}` \
                                         (dropped and re-created, or swapped); its changes are not \
                                         streamed. Fix with: {fix} (on_publication_drift = \"stop\")",
                                        cfg.publication
                                    ),
                                )
                                .into(),
                            ));
                        }
                        if known.should_log(Drift::NotPublished) {
                            tracing::error!(
                                table = qualified, publication = %cfg.publication,
                                "rule table is no longer published (dropped and re-created, or \
                                 swapped) and the publication is not managed by cacheclear \
                                 (create_publication = false): its keys are evicted at every \
                                 check until fixed. Fix with: {fix}"
                            );
                        }
                        evict = true;
                    }
                } else if known.clear(Drift::NotPublished) {
                    tracing::info!(table = qualified, "rule table is published again");
                }
                match table.check_replica_identity(&now.identity, &now.columns) {
                    Err(e) => {
                        if !known
                            .logged
                            .iter()
                            .any(|(d, _)| *d == Drift::ReplicaIdentity)
                        {
                            count(qualified, Drift::ReplicaIdentity);
                        }
                        if known.should_log(Drift::ReplicaIdentity) {
                            tracing::error!(
                                table = qualified, error = %e,
                                "the rule table's old rows no longer carry the rule's columns; \
                                 each UPDATE and DELETE evicts every key of the table until fixed"
                            );
                        }
                    }
                    Ok(()) => {
                        if known.clear(Drift::ReplicaIdentity) {
                            tracing::info!(
                                table = qualified,
                                "the rule table's replica identity serves its rule again"
                            );
                        }
                    }
                }
            }
        }
        if evict && let Err(e) = catalog::request_table_eviction(&client, qualified).await {
            // Not recorded as seen: the next check finds the same drift and tries again.
            tracing::warn!(table = qualified, error = %e, "publication watch: eviction request failed; retrying at the next check");
            continue;
        }
        known.found = now;
    }
    Ok(())
}

/// A partitioned rule table's partitions, sorted.
fn partition_names(t: &RuleTable) -> Vec<&str> {
    let mut n: Vec<&str> = t.partitions.iter().map(|(p, _, _)| p.as_str()).collect();
    n.sort_unstable();
    n
}

fn count(table: &str, drift: Drift) {
    metrics::counter!(
        telemetry::PUBLICATION_DRIFT,
        "table" => table.to_owned(),
        "reason" => drift.label()
    )
    .increment(1);
}
