//! Start-up work against the database catalog: the publication, the slot, and the check that
//! every rule can be served by its table's replica identity.

use cacheclear_protocol::Lsn;
use cacheclear_rules::{ReplicaIdentity, Rules};

use cacheclear_protocol::ConfigError;

use crate::SourceError;

/// What start-up found or did to the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SlotState {
    /// The slot existed; streaming resumes from its confirmed position.
    Resumed {
        /// The slot's `confirmed_flush_lsn`.
        confirmed_flush: Lsn,
    },
    /// The slot was created now, at this consistent point: nothing committed before it will be
    /// seen, so every rule table's keys must be evicted once.
    Created {
        /// The slot's consistent point.
        at: Lsn,
    },
}

/// Checks every rule table: it exists, its columns cover the templates, and its replica identity
/// carries every rule column in old-row images.
///
/// # Errors
/// [`SourceError::Rule`] naming the table, template, column and the `ALTER TABLE … REPLICA
/// IDENTITY FULL` fix; [`SourceError::Config`] for a missing table.
pub(crate) async fn check_rules(
    client: &tokio_postgres::Client,
    rules: &Rules,
) -> Result<(), SourceError> {
    for table in rules.tables() {
        let row = client
            .query_opt(
                "SELECT c.relreplident::text,
                        array(SELECT a.attname::text FROM pg_attribute a
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                              ORDER BY a.attnum),
                        array(SELECT a.attname::text FROM pg_index i
                              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                              WHERE i.indrelid = c.oid
                                AND CASE c.relreplident WHEN 'd' THEN i.indisprimary
                                                        WHEN 'i' THEN i.indisreplident
                                                        ELSE false END)
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&table.schema(), &table.name()],
            )
            .await?;
        let Some(row) = row else {
            return Err(ConfigError::new(
                "rules", format!(
                "table `{}` does not exist in the database (check the schema, e.g. `public.product`)",
                table.qualified()
            )).into());
        };
        let ident: String = row.try_get(0)?;
        let columns: Vec<String> = row.try_get(1)?;
        let key_columns: Vec<String> = row.try_get(2)?;
        let identity = match ident.as_str() {
            "f" => ReplicaIdentity::Full,
            "n" => ReplicaIdentity::Nothing,
            "i" => ReplicaIdentity::Index { key_columns },
            _ => ReplicaIdentity::Default { key_columns },
        };
        table.check_replica_identity(&identity, &columns)?;
    }
    Ok(())
}

fn quote_ident(name: &str) -> String {
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
    create: bool,
) -> Result<(), SourceError> {
    let tables: Vec<String> = rules
        .tables()
        .map(|t| format!("{}.{}", quote_ident(t.schema()), quote_ident(t.name())))
        .collect();
    let existing = client
        .query_opt(
            "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_publication WHERE pubname = $1",
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
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                quote_ident(name),
                tables.join(", ")
            ))
            .await?;
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
    let mut missing = Vec::new();
    for t in rules.tables() {
        let published = client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&name, &t.schema(), &t.name()],
            )
            .await?;
        if published.is_none() {
            missing.push(format!(
                "{}.{}",
                quote_ident(t.schema()),
                quote_ident(t.name())
            ));
        }
    }
    if !missing.is_empty() {
        return Err(ConfigError::new(
            "postgres.publication", format!(
            "publication `{name}` does not publish rule table(s) {}; fix with: ALTER PUBLICATION {} ADD TABLE {};",
            missing.join(", "),
            quote_ident(name),
            missing.join(", ")
        )).into());
    }
    Ok(())
}

/// Finds the slot, or creates it (pgoutput) when absent and `create` is set.
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
) -> Result<SlotState, SourceError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, confirmed_flush_lsn::text, coalesce(wal_status, '')
             FROM pg_replication_slots WHERE slot_name = $1",
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
        if wal_status == "lost" {
            return Err(ConfigError::new(
                "postgres.slot", format!(
                "slot `{slot}` was invalidated (wal_status = lost: WAL it needed was removed, see max_slot_wal_keep_size). Invalidations since it fell behind are lost. Drop it with SELECT pg_drop_replication_slot('{slot}'); and restart: the new slot evicts every rule table's keys once"
            )).into());
        }
        let confirmed_flush = confirmed
            .as_deref()
            .unwrap_or("0/0")
            .parse()
            .map_err(|e| ConfigError::new("postgres.slot", format!("{e}")))?;
        return Ok(SlotState::Resumed { confirmed_flush });
    }
    if !create {
        return Err(ConfigError::new(
            "postgres.slot", format!(
            "slot `{slot}` does not exist and create_slot = false; create it with: SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');"
        )).into());
    }
    let row = client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await?;
    let at: String = row.try_get(0)?;
    let at = at
        .parse()
        .map_err(|e| ConfigError::new("postgres.slot", format!("{e}")))?;
    tracing::info!(slot, %at, "created logical replication slot");
    Ok(SlotState::Created { at })
}
