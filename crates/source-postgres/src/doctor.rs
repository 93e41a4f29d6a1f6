//! `cacheclear doctor`'s PostgreSQL checks: is this database set up so that the pipeline can
//! work? The same queries `run` makes at start (`catalog.rs`), answered as findings with their
//! fixes instead of a refusal, plus what `run` cannot see from one start (capacity, slot health,
//! synchronous standbys).

use cacheclear_protocol::{Check, redact_url};
use cacheclear_rules::Rules;

use crate::catalog::{self, quote_ident};
use crate::{PostgresConfig, connect};

/// Runs every PostgreSQL check for `cfg` and `rules`, in this order: `postgres.connect`,
/// `postgres.version`, `postgres.wal_level`, `postgres.replication_capacity`, `postgres.role`,
/// `postgres.publication`, `postgres.replica_identity`, `postgres.slot`,
/// `postgres.synchronous_standby`. When the connection fails only `postgres.connect` is
/// returned. Never fails itself: a query error becomes a `fail` finding.
///
/// A database that `run` would start on — slot and publication not created yet, with
/// `create_slot` and `create_publication` set — has no `fail`.
pub async fn diagnose(cfg: &PostgresConfig, rules: &Rules) -> Vec<Check> {
    let mut checks = Vec::new();
    let client = match connect_once(cfg).await {
        Ok(c) => c,
        Err(e) => {
            checks.push(Check::fail(
                "postgres.connect",
                format!("cannot connect to {}: {e}", redact_url(&cfg.url)),
                "check postgres.url (host, port, user, database, password; for TLS sslmode and sslrootcert: see README, PostgreSQL over TLS) and that the server accepts this client (pg_hba.conf)",
            ));
            return checks;
        }
    };
    checks.push(Check::ok(
        "postgres.connect",
        format!("connected to {}", redact_url(&cfg.url)),
    ));
    macro_rules! attempt {
        ($id:literal, $e:expr) => {
            match $e.await {
                Ok(c) => checks.extend(c),
                Err(e) => checks.push(Check::fail(
                    $id,
                    format!("the check's query failed: {e}"),
                    "see the error; the user may lack privileges to read the catalog",
                )),
            }
        };
    }
    attempt!("postgres.version", version(&client));
    attempt!("postgres.wal_level", wal_level(&client));
    attempt!("postgres.replication_capacity", capacity(&client, cfg));
    attempt!("postgres.role", role(&client, cfg));
    // One catalog query serves the publication and replica-identity checks.
    match catalog::inspect_rule_tables(&client, rules, &cfg.publication).await {
        Ok(found) => {
            attempt!(
                "postgres.publication",
                publication(&client, cfg, rules, &found)
            );
            checks.extend(replica_identity(rules, &found));
        }
        Err(e) => {
            for id in ["postgres.publication", "postgres.replica_identity"] {
                checks.push(Check::fail(
                    id,
                    format!("the check's query failed: {e}"),
                    "see the error; the user may lack privileges to read the catalog",
                ));
            }
        }
    }
    attempt!("postgres.slot", slot(&client, cfg));
    attempt!("postgres.synchronous_standby", synchronous(&client));
    checks
}

type Found = Result<Vec<Check>, QueryFailed>;

/// A check's query failed (the message says why).
struct QueryFailed(String);

impl std::fmt::Display for QueryFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<tokio_postgres::Error> for QueryFailed {
    fn from(e: tokio_postgres::Error) -> QueryFailed {
        QueryFailed(cacheclear_pg_tls::describe(&e))
    }
}

impl From<crate::SourceError> for QueryFailed {
    fn from(e: crate::SourceError) -> QueryFailed {
        QueryFailed(e.to_string())
    }
}

async fn connect_once(cfg: &PostgresConfig) -> Result<deadpool_postgres::Object, String> {
    let pool = connect::pool(&cfg.url, 1).map_err(|e| e.to_string())?;
    let client = tokio::time::timeout(std::time::Duration::from_secs(10), pool.get())
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
        .map_err(|e| crate::error::describe_pool(&e))?;
    Ok(client)
}

async fn show(client: &tokio_postgres::Client, setting: &str) -> Result<String, QueryFailed> {
    Ok(client
        .query_one("SELECT current_setting($1)", &[&setting])
        .await?
        .try_get(0)?)
}

async fn version(client: &tokio_postgres::Client) -> Found {
    let num: i32 = show(client, "server_version_num")
        .await?
        .parse()
        .unwrap_or(0);
    let text = show(client, "server_version").await?;
    Ok(vec![if num >= 140_000 {
        Check::ok("postgres.version", format!("PostgreSQL {text}"))
    } else {
        Check::fail(
            "postgres.version",
            format!("PostgreSQL {text}"),
            "cacheclear needs PostgreSQL 14 or later (pgoutput logical messages)",
        )
    }])
}

async fn wal_level(client: &tokio_postgres::Client) -> Found {
    let level = show(client, "wal_level").await?;
    Ok(vec![if level == "logical" {
        Check::ok("postgres.wal_level", "wal_level = logical")
    } else {
        Check::fail(
            "postgres.wal_level",
            format!("wal_level = {level}"),
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL (on RDS/Aurora: rds.logical_replication = 1 in the parameter group; Cloud SQL: cloudsql.logical_decoding = on)",
        )
    }])
}

async fn capacity(client: &tokio_postgres::Client, cfg: &PostgresConfig) -> Found {
    let row = client
        .query_one(
            "SELECT current_setting('max_replication_slots')::int,
                    (SELECT count(*)::int FROM pg_replication_slots),
                    current_setting('max_wal_senders')::int,
                    (SELECT count(*)::int FROM pg_stat_replication),
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&cfg.slot],
        )
        .await?;
    let (max_slots, slots, max_senders, senders, ours): (i32, i32, i32, i32, bool) = (
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
    );
    let found = format!(
        "{slots} of max_replication_slots = {max_slots} used, {senders} of max_wal_senders = {max_senders} used"
    );
    let slot_missing = !ours && slots >= max_slots;
    Ok(vec![if slot_missing || senders >= max_senders {
        Check::fail(
            "postgres.replication_capacity",
            found,
            "raise max_replication_slots / max_wal_senders (restart needed) or drop unused slots (SELECT pg_drop_replication_slot(name))",
        )
    } else if !ours && slots + 1 >= max_slots {
        Check::warn(
            "postgres.replication_capacity",
            found,
            "cacheclear's slot takes the last free slot: raise max_replication_slots for headroom",
        )
    } else {
        Check::ok("postgres.replication_capacity", found)
    }])
}

async fn role(client: &tokio_postgres::Client, cfg: &PostgresConfig) -> Found {
    let row = client
        .query_one(
            "SELECT current_user::text, rolsuper, rolreplication,
                    has_database_privilege(current_database(), 'CREATE'),
                    EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)
             FROM pg_roles WHERE rolname = current_user",
            &[&cfg.publication],
        )
        .await?;
    let (user, superuser, replication, create, has_pub): (String, bool, bool, bool, bool) = (
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
    );
    let mut out = Vec::new();
    if !(superuser || replication) {
        out.push(Check::fail(
            "postgres.role",
            format!("role `{user}` has neither REPLICATION nor superuser"),
            format!(
                "ALTER ROLE {} REPLICATION; (on RDS: GRANT rds_replication TO {};)",
                quote_ident(&user),
                quote_ident(&user)
            ),
        ));
    } else if cfg.create_publication && !has_pub && !superuser && !create {
        out.push(Check::fail(
            "postgres.role",
            format!(
                "role `{user}` may not create the publication `{}` (no CREATE on the database)",
                cfg.publication
            ),
            format!(
                "GRANT CREATE ON DATABASE <db> TO {}; or create the publication as its owner and set create_publication = false",
                quote_ident(&user)
            ),
        ));
    } else {
        out.push(Check::ok(
            "postgres.role",
            format!(
                "role `{user}`: {}",
                if superuser {
                    "superuser"
                } else {
                    "REPLICATION"
                }
            ),
        ));
    }
    Ok(out)
}

async fn publication(
    client: &tokio_postgres::Client,
    cfg: &PostgresConfig,
    rules: &Rules,
    found: &[catalog::RuleTable],
) -> Found {
    let id = "postgres.publication";
    let name = &cfg.publication;
    let row = client
        .query_opt(
            "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate, pubviaroot
             FROM pg_publication WHERE pubname = $1",
            &[name],
        )
        .await?;
    let tables: Vec<String> = rules
        .tables()
        .map(|t| format!("{}.{}", quote_ident(t.schema()), quote_ident(t.name())))
        .collect();
    let Some(row) = row else {
        let create = format!(
            "CREATE PUBLICATION {} FOR TABLE {};",
            quote_ident(name),
            tables.join(", ")
        );
        return Ok(vec![if cfg.create_publication {
            Check::warn(
                id,
                format!("publication `{name}` does not exist yet"),
                format!("`run` creates it at start (create_publication = true): {create}"),
            )
        } else {
            Check::fail(
                id,
                format!("publication `{name}` does not exist and create_publication = false"),
                create,
            )
        }]);
    };
    let (all_ops, via_root): (bool, bool) = (row.try_get(0)?, row.try_get(1)?);
    if !all_ops {
        return Ok(vec![Check::fail(
            id,
            format!(
                "publication `{name}` does not publish all of insert, update, delete, truncate"
            ),
            format!(
                "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');",
                quote_ident(name)
            ),
        )]);
    }
    if via_root && let Some(t) = found.iter().find(|t| t.in_partition_tree) {
        return Ok(vec![Check::fail(
            id,
            format!(
                "publication `{name}` publishes via the partition root and `{}` is partitioned or a partition: a TRUNCATE of one partition would not be sent",
                t.qualified
            ),
            format!(
                "ALTER PUBLICATION {} SET (publish_via_partition_root = false);",
                quote_ident(name)
            ),
        )]);
    }
    let missing: Vec<&String> = tables
        .iter()
        .zip(found)
        .filter(|(_, f)| f.oid.is_some() && !f.published)
        .map(|(t, _)| t)
        .collect();
    Ok(vec![if missing.is_empty() {
        Check::ok(
            id,
            format!(
                "publication `{name}` publishes every rule table ({}) with insert, update, delete, truncate",
                tables.len()
            ),
        )
    } else {
        let fix = format!(
            "ALTER PUBLICATION {} ADD TABLE {};",
            quote_ident(name),
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let found = format!(
            "publication `{name}` does not publish {}",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if cfg.create_publication {
            Check::warn(
                id,
                found,
                format!(
                    "`run` adds it back and evicts its keys (create_publication = true): {fix}"
                ),
            )
        } else {
            Check::fail(id, found, fix)
        }
    }])
}

fn replica_identity(rules: &Rules, found: &[catalog::RuleTable]) -> Vec<Check> {
    let id = "postgres.replica_identity";
    let mut out = Vec::new();
    for (table, f) in rules.tables().zip(found) {
        let q = table.qualified();
        if f.oid.is_none() {
            out.push(Check::fail(
                id,
                format!("rule table `{q}` does not exist"),
                "create it, or fix the rule's table name (schema.table)",
            ));
            continue;
        }
        let root = format!(
            "{}.{}",
            cacheclear_rules::quote_ident(table.schema()),
            cacheclear_rules::quote_ident(table.name())
        );
        // (the table to fix, what is wrong)
        let mut problem = table
            .check_replica_identity(&f.identity, &f.columns)
            .err()
            .map(|e| (root.clone(), format!("`{q}`: {e}")));
        if problem.is_none() {
            problem = f.partitions.iter().find_map(|(p, identity, columns)| {
                table
                    .check_replica_identity(identity, columns)
                    .err()
                    .map(|e| (p.clone(), catalog::partition_gap(p, &root, &e)))
            });
        }
        out.push(match problem {
            None => Check::ok(
                id,
                format!(
                    "`{q}`: old rows carry every column its rules read{}",
                    if f.partitions.is_empty() {
                        String::new()
                    } else {
                        format!(" (and in each of its {} partitions)", f.partitions.len())
                    }
                ),
            ),
            Some((which, found)) => Check::fail(
                id,
                found,
                format!("ALTER TABLE {which} REPLICA IDENTITY FULL;"),
            ),
        });
    }
    out
}

async fn slot(client: &tokio_postgres::Client, cfg: &PostgresConfig) -> Found {
    let id = "postgres.slot";
    let name = &cfg.slot;
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text = current_database(), active,
                    coalesce(wal_status, ''),
                    coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::float8,
                    current_setting('max_slot_wal_keep_size')
             FROM pg_replication_slots WHERE slot_name = $1",
            &[name],
        )
        .await?;
    let Some(row) = row else {
        return Ok(vec![if cfg.create_slot {
            Check::warn(
                id,
                format!("slot `{name}` does not exist yet"),
                "`run` creates it at start (create_slot = true) and then evicts every rule table's keys once",
            )
        } else {
            Check::fail(
                id,
                format!("slot `{name}` does not exist and create_slot = false"),
                format!("SELECT pg_create_logical_replication_slot('{name}', 'pgoutput');"),
            )
        }]);
    };
    let plugin: Option<String> = row.try_get(0)?;
    let same_db: Option<bool> = row.try_get(1)?;
    let active: bool = row.try_get(2)?;
    let wal_status: String = row.try_get(3)?;
    let retained: f64 = row.try_get(4)?;
    let keep: String = row.try_get(5)?;
    if plugin.as_deref() != Some("pgoutput") || same_db != Some(true) {
        return Ok(vec![Check::fail(
            id,
            format!("slot `{name}` is not a pgoutput slot of this database (plugin {plugin:?})"),
            "choose another postgres.slot name",
        )]);
    }
    let found = format!(
        "slot `{name}`: {}, wal_status = {wal_status}, retained WAL {:.1} MB (max_slot_wal_keep_size = {keep})",
        if active {
            "active (streamed by a pipeline)"
        } else {
            "inactive"
        },
        retained / 1e6
    );
    if wal_status == "lost" {
        return Ok(vec![Check::fail(
            id,
            found,
            format!(
                "invalidations were lost: SELECT pg_drop_replication_slot('{name}'); then restart `run` (the new slot evicts every rule table's keys once)"
            ),
        )]);
    }
    if wal_status == "unreserved" {
        return Ok(vec![Check::warn(
            id,
            found,
            "the slot is about to lose WAL it needs (max_slot_wal_keep_size): make sure `run` is streaming, or raise the limit",
        )]);
    }
    Ok(vec![if active {
        Check::ok(id, found)
    } else {
        Check::warn(
            id,
            found,
            "no pipeline streams from this slot: start `cacheclear run` (an inactive slot retains WAL), or drop it if decommissioned",
        )
    }])
}

async fn synchronous(client: &tokio_postgres::Client) -> Found {
    let names = show(client, "synchronous_standby_names").await?;
    Ok(vec![if names.trim().is_empty() {
        Check::ok(
            "postgres.synchronous_standby",
            "no synchronous standby (synchronous_standby_names is empty)",
        )
    } else {
        Check::warn(
            "postgres.synchronous_standby",
            format!("synchronous_standby_names = '{names}'"),
            "the visibility barrier waits for each commit to be acknowledged by the synchronous standby before evicting: invalidation lag includes the standby's; watch cacheclear_visibility_barrier_ms",
        )
    }])
}
