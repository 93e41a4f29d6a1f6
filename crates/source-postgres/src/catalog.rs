//! Start-up work against the database catalog: the publication, the slot, and the check that
//! every rule can be served by its table's replica identity.

use cacheclear_protocol::Lsn;
use cacheclear_rules::{ReplicaIdentity, Rules};

use cacheclear_protocol::ConfigError;

use crate::SourceError;
use crate::config::SlotLostPolicy;

/// What start-up found or did to the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SlotState {
    /// The slot existed; streaming resumes from its confirmed position.
    Resumed {
        /// The slot's `confirmed_flush_lsn`.
        confirmed_flush: Lsn,
        /// A PostgreSQL 17 failover slot (`failover = true`): synchronized to standbys, so its
        /// position stays valid across a promotion (no epoch bump for the origin change).
        failover: bool,
    },
    /// The slot was created now, at this consistent point: nothing committed before it will be
    /// seen, so every rule table's keys must be evicted once.
    Created {
        /// The slot's consistent point.
        at: Lsn,
        /// The slot was invalidated (`wal_status = lost`) and recreated now
        /// (`on_slot_lost = "flush_and_recreate"`).
        lost: bool,
    },
    /// No slot yet, and `create_slot` allows one: the caller bumps the epoch, then creates it.
    Missing,
    /// The slot was invalidated and `on_slot_lost = "flush_and_recreate"`: the caller bumps the
    /// epoch, then drops and recreates it.
    Lost,
}

/// The origin of the stream, `system_identifier/timeline` (timeline in hex, from the current
/// WAL file name, so a promotion shows at once).
pub(crate) async fn origin(client: &tokio_postgres::Client) -> Result<String, SourceError> {
    let row = client
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()) || '/' || \
                    substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
            &[],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// What the catalog says of one rule table now (one row of [`inspect_rule_tables`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuleTable {
    /// `schema.table` as the rule names it.
    pub(crate) qualified: String,
    /// The table's OID, `None` when no table of that name exists (dropped, or renamed away).
    pub(crate) oid: Option<u32>,
    /// Its replica identity (with the key or index columns).
    pub(crate) identity: ReplicaIdentity,
    /// Every column, in order.
    pub(crate) columns: Vec<String>,
    /// Whether the publication publishes it: by that name (`pg_publication_tables`, so `FOR ALL
    /// TABLES` and `FOR TABLES IN SCHEMA` publications count), as a member (`FOR TABLE`; a
    /// partitioned table's partitions are then published under their own names), or, for a
    /// partitioned table, through its partitions.
    pub(crate) published: bool,
    /// A partitioned table (`relkind = 'p'`) or a partition: rows arrive under the partition's
    /// name unless the publication publishes via the root.
    pub(crate) in_partition_tree: bool,
    /// For a partitioned table: each partition (leaf) as `schema.table`, quoted as SQL needs it
    /// (`public."Orders_2026"`), with its replica identity and columns, which may differ from
    /// the root's.
    pub(crate) partitions: Vec<(String, ReplicaIdentity, Vec<String>)>,
}

/// One catalog query for every rule table: its OID, replica identity, columns, and whether
/// `publication` publishes it. Used at start ([`check_rules`]) and by the publication watch.
///
/// # Errors
/// [`SourceError::Query`] when the query fails.
pub(crate) async fn inspect_rule_tables(
    client: &tokio_postgres::Client,
    rules: &Rules,
    publication: &str,
) -> Result<Vec<RuleTable>, SourceError> {
    let (schemas, names): (Vec<&str>, Vec<&str>) =
        rules.tables().map(|t| (t.schema(), t.name())).unzip();
    let rows = client
        .query(
            "SELECT t.ord::int4, c.oid::int8, coalesce(c.relreplident::text, 'd'),
                    array(SELECT a.attname::text FROM pg_attribute a
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                          ORDER BY a.attnum),
                    array(SELECT a.attname::text FROM pg_index i
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                          WHERE i.indrelid = c.oid
                            AND CASE c.relreplident WHEN 'd' THEN i.indisprimary
                                                    WHEN 'i' THEN i.indisreplident
                                                    ELSE false END),
                    EXISTS (SELECT 1 FROM pg_publication_tables pt
                            WHERE pt.pubname = $3 AND pt.schemaname = t.schema
                              AND pt.tablename = t.name)
                    OR EXISTS (SELECT 1 FROM pg_publication_rel pr
                               JOIN pg_publication p ON p.oid = pr.prpubid
                               WHERE p.pubname = $3 AND pr.prrelid = c.oid)
                    OR (c.relkind = 'p' AND EXISTS (
                          SELECT 1 FROM pg_partition_tree(c.oid) pt2
                          JOIN pg_class lc ON lc.oid = pt2.relid
                          JOIN pg_namespace ln ON ln.oid = lc.relnamespace
                          JOIN pg_publication_tables pt ON pt.pubname = $3
                           AND pt.schemaname = ln.nspname AND pt.tablename = lc.relname
                          WHERE pt2.isleaf)),
                    coalesce(c.relkind = 'p' OR c.relispartition, false),
                    array(SELECT format('%I.%I', ln.nspname, lc.relname) || '|' || lc.relreplident::text
                                 || '|' || array_to_string(array(
                                      SELECT a.attname FROM pg_attribute a
                                      WHERE a.attrelid = lc.oid AND a.attnum > 0
                                        AND NOT a.attisdropped ORDER BY a.attnum), ',')
                                 || '|' || array_to_string(array(
                                      SELECT a.attname FROM pg_index i
                                      JOIN pg_attribute a ON a.attrelid = i.indrelid
                                       AND a.attnum = ANY(i.indkey)
                                      WHERE i.indrelid = lc.oid
                                        AND CASE lc.relreplident WHEN 'd' THEN i.indisprimary
                                                                 WHEN 'i' THEN i.indisreplident
                                                                 ELSE false END), ',')
                          FROM pg_partition_tree(c.oid) pt3
                          JOIN pg_class lc ON lc.oid = pt3.relid
                          JOIN pg_namespace ln ON ln.oid = lc.relnamespace
                          WHERE c.relkind = 'p' AND pt3.isleaf)
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(schema, name, ord)
             LEFT JOIN pg_namespace n ON n.nspname = t.schema
             LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.name
                                 AND c.relkind IN ('r', 'p')
             ORDER BY t.ord",
            &[&schemas, &names, &publication],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for (table, row) in rules.tables().zip(&rows) {
        let oid: Option<i64> = row.try_get(1)?;
        let ident: String = row.try_get(2)?;
        let key_columns: Vec<String> = row.try_get(4)?;
        out.push(RuleTable {
            qualified: table.qualified().to_owned(),
            oid: oid.and_then(|o| u32::try_from(o).ok()),
            identity: match ident.as_str() {
                "f" => ReplicaIdentity::Full,
                "n" => ReplicaIdentity::Nothing,
                "i" => ReplicaIdentity::Index { key_columns },
                _ => ReplicaIdentity::Default { key_columns },
            },
            columns: row.try_get(3)?,
            published: row.try_get(5)?,
            in_partition_tree: row.try_get(6)?,
            partitions: row
                .try_get::<_, Vec<String>>(7)?
                .iter()
                .filter_map(|p| parse_partition(p))
                .collect(),
        });
    }
    Ok(out)
}

/// Why partition `partition` (SQL-quoted `schema.table`) of rule table `root` cannot serve the
/// rule, with the fix on the partition itself (the rule error's own fix names the root, whose
/// replica identity does not reach its partitions).
pub(crate) fn partition_gap(
    partition: &str,
    root: &str,
    e: &cacheclear_rules::RuleError,
) -> String {
    let why = e.to_string();
    let why = why
        .split(" Fix:")
        .next()
        .unwrap_or(&why)
        .trim_end_matches('.');
    format!(
        "partition {partition} of rule table {root}: {why}. Fix with: ALTER TABLE {partition} \
         REPLICA IDENTITY FULL; (each partition has its own replica identity)"
    )
}

/// One partition of [`inspect_rule_tables`]'s array: `schema.table|relreplident|col,col|key,key`
/// (column names cannot hold `,` or `|` here only if a user named them so; such a partition is
/// then checked as FULL-less and reported).
fn parse_partition(text: &str) -> Option<(String, ReplicaIdentity, Vec<String>)> {
    let mut parts = text.splitn(4, '|');
    let name = parts.next()?.to_owned();
    let ident = parts.next()?;
    let split = |s: &str| -> Vec<String> {
        s.split(',')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let columns = split(parts.next()?);
    let key_columns = split(parts.next().unwrap_or(""));
    let identity = match ident {
        "f" => ReplicaIdentity::Full,
        "n" => ReplicaIdentity::Nothing,
        "i" => ReplicaIdentity::Index { key_columns },
        _ => ReplicaIdentity::Default { key_columns },
    };
    Some((name, identity, columns))
}

/// Checks every rule table: it exists, its columns cover the templates, and its replica identity
/// carries every rule column in old-row images. Returns what it found, for the publication watch.
///
/// # Errors
/// [`SourceError::Rule`] naming the table, template, column and the `ALTER TABLE … REPLICA
/// IDENTITY FULL` fix; [`SourceError::Config`] for a missing table.
pub(crate) async fn check_rules(
    client: &tokio_postgres::Client,
    rules: &Rules,
    publication: &str,
) -> Result<Vec<RuleTable>, SourceError> {
    let found = inspect_rule_tables(client, rules, publication).await?;
    for (table, found) in rules.tables().zip(&found) {
        if found.oid.is_none() {
            return Err(ConfigError::new(
                "rules",
                format!(
                    "table `{}` does not exist in the database (check the schema, e.g. `public.product`)",
                    table.qualified()
                ),
            )
            .into());
        }
        table.check_replica_identity(&found.identity, &found.columns)?;
        // Each partition has a replica identity of its own (ALTER TABLE on the root does not
        // change it), and its rows arrive under its own name.
        for (partition, identity, columns) in &found.partitions {
            if let Err(e) = table.check_replica_identity(identity, columns) {
                return Err(ConfigError::new(
                    "rules",
                    partition_gap(partition, table.qualified(), &e),
                )
                .into());
            }
        }
    }
    Ok(found)
}

/// `name` as a quoted SQL identifier.
/// `e` when it is not SQLSTATE 42501 (insufficient privilege); otherwise a [`ConfigError`] on
/// `field` carrying the server's message and `fix(role)`, where `role` is the connected role,
/// quoted as an identifier (the fix is a statement to run).
async fn privilege_error(
    client: &tokio_postgres::Client,
    e: tokio_postgres::Error,
    field: &'static str,
    fix: impl FnOnce(&str) -> String,
) -> SourceError {
    if e.code() != Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
        return e.into();
    }
    let role = match client.query_one("SELECT current_user::text", &[]).await {
        Ok(row) => row
            .try_get::<_, String>(0)
            .map_or_else(|_| "<role>".to_owned(), |r| quote_ident(&r)),
        Err(_) => "<role>".to_owned(),
    };
    ConfigError::new(
        field,
        format!("{}; {}", cacheclear_pg_tls::describe(&e), fix(&role)),
    )
    .into()
}

/// The fix for a role that may not use replication slots.
fn replication_fix(role: &str) -> String {
    format!(
        "role {role} needs the REPLICATION attribute: ALTER ROLE {role} REPLICATION; \
         (Amazon RDS and Aurora: GRANT rds_replication TO {role};)"
    )
}

pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Creates the publication `FOR TABLE` every rule table when it is absent (and `create` is set);
/// when present, checks it publishes every rule table with inserts, updates, deletes and truncates.
///
/// # Errors
/// [`SourceError::Config`] naming the publication, the missing tables or actions and the SQL that
/// fixes it.
pub(crate) async fn ensure_publication(
    client: &tokio_postgres::Client,
    name: &str,
    rules: &Rules,
    found: &[RuleTable],
    create: bool,
) -> Result<(), SourceError> {
    let tables: Vec<String> = rules
        .tables()
        .map(|t| format!("{}.{}", quote_ident(t.schema()), quote_ident(t.name())))
        .collect();
    let existing = client
        .query_opt(
            "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate, pubviaroot
             FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?;
    let Some(existing) = existing else {
        if !create {
            return Err(ConfigError::new(
                "postgres.publication", format!(
                "publication `{name}` does not exist and create_publication = false; create it with: CREATE PUBLICATION {} FOR TABLE {};",
                quote_ident(name),
                tables.join(", ")
            )).into());
        }
        // publish_via_partition_root stays false (the default): with it, PostgreSQL does not send
        // a TRUNCATE of a single partition at all; partitions are mapped to their root's rule by
        // the reader instead.
        let create = format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            quote_ident(name),
            tables.join(", ")
        );
        if let Err(e) = client.batch_execute(&create).await {
            return Err(privilege_error(client, e, "postgres.publication", |role| {
                format!(
                    "role {role} may not create the publication (it needs CREATE on the database and \
                     ownership of every rule table); have the tables' owner or a superuser run \
                     `{create};` and set create_publication = false"
                )
            })
            .await);
        }
        tracing::info!(publication = name, tables = ?tables, "created publication");
        return Ok(());
    };
    if !existing.try_get::<_, bool>(0)? {
        return Err(ConfigError::new(
            "postgres.publication", format!(
            "publication `{name}` does not publish all of insert, update, delete and truncate; fix with: ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');",
            quote_ident(name)
        )).into());
    }
    if existing.try_get::<_, bool>(1)?
        && let Some(t) = found.iter().find(|t| t.in_partition_tree)
    {
        return Err(ConfigError::new(
                "postgres.publication", format!(
                "publication `{name}` publishes via the partition root, and rule table `{}` is partitioned or a partition: PostgreSQL then sends no TRUNCATE of a single partition (its keys would stay cached), and a rule naming a partition never sees its rows. Fix with: ALTER PUBLICATION {} SET (publish_via_partition_root = false); (cacheclear maps partitions to their root's rule itself)",
                t.qualified,
                quote_ident(name)
            )).into());
    }
    let missing: Vec<String> = tables
        .iter()
        .zip(found)
        .filter(|(_, f)| !f.published)
        .map(|(quoted, _)| quoted.clone())
        .collect();
    if !missing.is_empty() {
        if !create {
            return Err(ConfigError::new(
                "postgres.publication", format!(
                "publication `{name}` does not publish rule table(s) {}; fix with: ALTER PUBLICATION {} ADD TABLE {};",
                missing.join(", "),
                quote_ident(name),
                missing.join(", ")
            )).into());
        }
        // Ours to manage (create_publication = true): a rule table that left it (dropped and
        // re-created, swapped) while we were down is added back, then its keys are evicted in
        // WAL order: its changes since it left were never streamed.
        for (table, quoted) in rules.tables().zip(&tables) {
            if missing.contains(quoted) {
                republish(client, name, quoted).await?;
                request_table_eviction(client, table.qualified()).await?;
                tracing::warn!(
                    publication = name,
                    table = table.qualified(),
                    "rule table was missing from the publication: added it back and evicting its keys"
                );
            }
        }
    }
    Ok(())
}

/// `ALTER PUBLICATION … ADD TABLE …` for one rule table (`quoted_table` is already quoted).
///
/// # Errors
/// [`SourceError::Query`] when the server refuses (e.g. the user does not own the table).
pub(crate) async fn republish(
    client: &tokio_postgres::Client,
    publication: &str,
    quoted_table: &str,
) -> Result<(), SourceError> {
    client
        .batch_execute(&format!(
            "ALTER PUBLICATION {} ADD TABLE {quoted_table}",
            quote_ident(publication)
        ))
        .await?;
    Ok(())
}

/// Asks the pipeline, through the WAL, to evict every key of rule table `qualified`: a
/// transactional logical message ([`crate::changes::EVICT_TABLE_PREFIX`]) that the reader maps
/// to a table-wide eviction in commit order, after everything committed before it.
///
/// # Errors
/// [`SourceError::Query`] when the server refuses.
pub(crate) async fn request_table_eviction(
    client: &tokio_postgres::Client,
    qualified: &str,
) -> Result<(), SourceError> {
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1::text, $2::text)",
            &[&crate::changes::EVICT_TABLE_PREFIX, &qualified],
        )
        .await?;
    Ok(())
}

/// Finds the slot (see [`create_slot`] for creating it).
///
/// # Errors
/// [`SourceError::Config`] when the slot is absent and may not be created, uses another plugin,
/// belongs to another database, or was invalidated (`wal_status = 'lost'`, WAL removed under
/// `max_slot_wal_keep_size`): invalidations are then missing, and the fix (drop the slot; a new one
/// evicts every rule table's keys once) is in the message.
pub(crate) async fn ensure_slot(
    client: &tokio_postgres::Client,
    slot: &str,
    create: bool,
    on_lost: SlotLostPolicy,
) -> Result<SlotState, SourceError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, confirmed_flush_lsn::text, coalesce(wal_status, ''),
                    coalesce((to_jsonb(s) ->> 'failover')::bool, false)
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    if let Some(row) = row {
        let plugin: Option<String> = row.try_get(0)?;
        let database: Option<String> = row.try_get(1)?;
        let confirmed: Option<String> = row.try_get(2)?;
        let wal_status: String = row.try_get(3)?;
        let current_db: String = client
            .query_one("SELECT current_database()::text", &[])
            .await?
            .try_get(0)?;
        if plugin.as_deref() != Some("pgoutput") || database.as_deref() != Some(current_db.as_str())
        {
            return Err(ConfigError::new(
                "postgres.slot", format!(
                "slot `{slot}` exists but is not a pgoutput logical slot of database `{current_db}` (plugin {plugin:?}, database {database:?}); choose another slot name"
            )).into());
        }
        let failover: bool = row.try_get(4)?;
        if wal_status == "lost" && on_lost == SlotLostPolicy::FlushAndRecreate {
            return Ok(SlotState::Lost);
        }
        if wal_status == "lost" {
            return Err(ConfigError::new(
                "postgres.slot", format!(
                "slot `{slot}` was invalidated (wal_status = lost: WAL it needed was removed, see max_slot_wal_keep_size). Invalidations since it fell behind are lost. Drop it with SELECT pg_drop_replication_slot('{slot}'); and restart (or set postgres.on_slot_lost = \"flush_and_recreate\"): the new slot bumps the namespace's epoch"
            )).into());
        }
        let confirmed_flush = confirmed
            .as_deref()
            .unwrap_or("0/0")
            .parse()
            .map_err(|e| ConfigError::new("postgres.slot", format!("{e}")))?;
        return Ok(SlotState::Resumed {
            confirmed_flush,
            failover,
        });
    }
    if !create {
        return Err(ConfigError::new(
            "postgres.slot", format!(
            "slot `{slot}` does not exist and create_slot = false; create it with: SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');"
        )).into());
    }
    Ok(SlotState::Missing)
}

/// Creates the pgoutput slot (after dropping the invalidated one when `lost`), once the
/// namespace's epoch was bumped for the gap; with `failover` (PostgreSQL ≥ 17, checked by
/// [`check_failover_slot`] first) as a failover slot.
pub(crate) async fn create_slot(
    client: &tokio_postgres::Client,
    slot: &str,
    lost: bool,
    failover: bool,
) -> Result<SlotState, SourceError> {
    if lost {
        metrics::counter!(crate::telemetry::SLOT_LOST).increment(1);
        tracing::error!(
            slot,
            "slot was invalidated (wal_status = lost: WAL it needed was removed, see max_slot_wal_keep_size); invalidations since it fell behind are lost. on_slot_lost = flush_and_recreate: the namespace's epoch was bumped (every cached value is a miss); recreating the slot"
        );
        if let Err(e) = client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            return Err(privilege_error(client, e, "postgres.url", replication_fix).await);
        }
    }
    // The five-argument form (temporary, two-phase, failover) exists from PostgreSQL 17 on.
    let row = if failover {
        client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)",
                &[&slot],
            )
            .await
    } else {
        client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
    };
    let row = match row {
        Ok(row) => row,
        Err(e) => return Err(privilege_error(client, e, "postgres.url", replication_fix).await),
    };
    let at: String = row.try_get(0)?;
    let at = at
        .parse()
        .map_err(|e| ConfigError::new("postgres.slot", format!("{e}")))?;
    tracing::info!(slot, %at, failover, "created logical replication slot");
    Ok(SlotState::Created { at, lost })
}

/// `postgres.failover_slot = true` needs PostgreSQL 17 (`failover` slots, synchronized to
/// standbys with `sync_replication_slots`). Run before [`ensure_slot`]: refuses older servers;
/// warns when the slot already exists without `failover` (it was created before the setting, or
/// by hand), with the fix.
///
/// # Errors
/// [`SourceError::Config`] (`postgres.failover_slot`) on PostgreSQL before 17;
/// [`SourceError::Query`] when a catalog query fails.
pub(crate) async fn check_failover_slot(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<(), SourceError> {
    let version: String = client
        .query_one("SELECT current_setting('server_version_num')", &[])
        .await?
        .try_get(0)?;
    let num: u32 = version.trim().parse().unwrap_or(0);
    if num < 170_000 {
        return Err(ConfigError::new(
            "postgres.failover_slot",
            format!(
                "failover slots need PostgreSQL 17 or later, the server is {version}; set \
                 failover_slot = false (after a failover the new primary then has no slot: \
                 cacheclear creates one and evicts every rule table's keys once)"
            ),
        )
        .into());
    }
    let row = client
        .query_opt(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    if let Some(row) = row
        && !row.try_get::<_, bool>(0)?
    {
        tracing::warn!(
            slot,
            "postgres.failover_slot = true, but slot `{slot}` exists without failover (created \
             before the setting): a promoted standby will not have it. Fix: stop cacheclear and \
             run ALTER_REPLICATION_SLOT {slot} (FAILOVER true) on a replication connection \
             (psql \"dbname=… replication=database\"), or drop the slot and restart (the new \
             slot evicts every rule table's keys once)"
        );
    }
    Ok(())
}
