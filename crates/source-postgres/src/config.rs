//! `[postgres]` section of the configuration: where to stream from and how.

use std::time::Duration;

use cacheclear_protocol::ConfigError;

/// The CDC source's options. Every field has a default except `url`.
///
/// ```toml
/// [postgres]
/// url = "postgres://cacheclear:secret@127.0.0.1:5432/shop"
/// slot = "cacheclear"
/// publication = "cacheclear"
/// ```
#[derive(Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL (`postgres://user:password@host:port/dbname`) or libpq key=value string.
    /// The user needs the REPLICATION attribute (or superuser) and, to create the publication,
    /// ownership of the rule tables.
    pub url: String,
    /// Logical replication slot name. Created with the `pgoutput` plugin when absent (see
    /// `create_slot`). Default `cacheclear`.
    #[serde(default = "default_name")]
    pub slot: String,
    /// Publication name. Created `FOR TABLE <every rule table>` when absent (see
    /// `create_publication`). Default `cacheclear`.
    #[serde(default = "default_name")]
    pub publication: String,
    /// Create the slot when it does not exist. A new slot starts at the current WAL position:
    /// changes committed before it are never seen, so every rule table's keys are evicted once
    /// when the slot is created. Default `true`.
    #[serde(default = "yes")]
    pub create_slot: bool,
    /// Create the slot with `failover` (PostgreSQL 17 or later), so that standbys with
    /// `sync_replication_slots = on` keep a synchronized copy of it and a promoted standby
    /// continues the stream where the old primary left it. Only read when the slot is created;
    /// an existing slot without `failover` is reported at start (WARN) with the fix. On
    /// PostgreSQL before 17 `run` refuses to start. Default `false`.
    #[serde(default)]
    pub failover_slot: bool,
    /// Create the publication when it does not exist. Default `true`.
    #[serde(default = "yes")]
    pub create_publication: bool,
    /// Interval of `pg_logical_emit_message` heartbeats, in ms; 0 disables them. Heartbeats give an
    /// idle slot something to confirm so its retained WAL stays bounded. Default 10000.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    /// How often the confirmed LSN is reported to the server (standby status update), in ms.
    /// Default 1000.
    #[serde(default = "default_status_ms")]
    pub status_interval_ms: u64,
    /// Keys one transaction may evict one by one before its tables are evicted as a whole
    /// instead (the keys handed over in parts count too; see `max_batch_keys`). Default 2000000.
    #[serde(default = "default_max_txn_keys")]
    pub max_txn_keys: usize,
    /// A batch handed to the sink is closed at this many keys; larger batches amortise the
    /// visibility-barrier query and Redis round trips. A transaction that holds this many keys
    /// while it still streams is handed over in parts of this size (evicted once its commit is
    /// visible, confirmed only with its last part), so the pipeline never holds a large
    /// transaction whole. Default 20000.
    #[serde(default = "default_max_batch_keys")]
    pub max_batch_keys: usize,
    /// Batches queued between the decoder and the sink; with `max_batch_keys` this bounds the
    /// memory used while the sink is slow or down (back-pressure then pauses the replication
    /// stream, whose keepalives are still answered). Default 4.
    #[serde(default = "default_queue")]
    pub queue_batches: usize,
    /// Batches the sink applies at once, holding at most `2 × max_batch_keys` keys between them
    /// (a batch alone is always applied). Acknowledgements (and so confirmed LSNs) stay in
    /// commit order; applying concurrently hides the sink's round trip (a Kafka produce with
    /// `acks=all`, a Redis reply) from the transactions queued behind it. Evictions commute,
    /// so the order in which batches land does not matter. Default 4.
    #[serde(default = "default_in_flight")]
    pub max_batches_in_flight: usize,
    /// How long a stop (Ctrl-C, SIGTERM, [`crate::Pipeline::stop`]) may take to apply and confirm
    /// the transactions already read, in ms; what is left then is replayed from the slot on the
    /// next start. Default 5000.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// How often the publication watch checks, in ms, that every rule table is still published
    /// under its name, still the same table (OID) and still sends the rule's columns in old rows
    /// (one catalog query; every `Relation` message also triggers a check). A rule table that
    /// left the publication (dropped and re-created, swapped by a migration tool) is added back
    /// when `create_publication` is set, and its keys are evicted. 0 disables the periodic check.
    /// Default 5000.
    #[serde(default = "default_publication_check_ms")]
    pub publication_check_interval_ms: u64,
    /// What to do when a rule table is missing from a publication this process does not manage
    /// (`create_publication = false`): `evict` (default) logs an error with the `ALTER
    /// PUBLICATION … ADD TABLE` fix and evicts the table's keys on every check while it lasts;
    /// `stop` stops the pipeline with that error.
    #[serde(default)]
    pub on_publication_drift: DriftPolicy,
    /// The deployment namespace whose watermark and epoch this pipeline publishes in Redis
    /// (docs/architecture.md, "Watermark and epoch"); clients name the same one. Default: the
    /// slot name. Must not contain `{` or `}`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The watermark is refreshed at least this often, in ms, also when the database is idle: a
    /// transactional `pg_logical_emit_message(true, 'cacheclear.watermark', '')` travels through
    /// the WAL, the slot, the barrier and the sink, and its return measures the end-to-end lag.
    /// 0 disables the heartbeat (then clients with a staleness bound bypass the cache while the
    /// database is idle). Default 1000: a tenth of a WAL record per 100 ms, and well inside the
    /// clients' default `max_staleness_ms` of 5000.
    #[serde(default = "default_watermark_ms")]
    pub watermark_interval_ms: u64,
    /// What to do when the slot was invalidated (`wal_status = lost`): `flush_and_recreate`
    /// (default) bumps the namespace's epoch — every cached value becomes a miss — drops and
    /// recreates the slot, logs an error and counts it (`cacheclear_slot_lost_total`), and goes
    /// on; `stop` refuses to start with the fix in the message.
    #[serde(default)]
    pub on_slot_lost: SlotLostPolicy,
}

/// `postgres.on_slot_lost`: see [`PostgresConfig::on_slot_lost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotLostPolicy {
    /// Bump the epoch, drop and recreate the slot, continue.
    #[default]
    FlushAndRecreate,
    /// Refuse to start (the message says how to drop the slot).
    Stop,
}

/// `Debug` with the URL's password shown as `***` (a panic or a debug log line must not print
/// it).
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &cacheclear_protocol::redact_url(&self.url))
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("create_slot", &self.create_slot)
            .field("failover_slot", &self.failover_slot)
            .field("create_publication", &self.create_publication)
            .finish_non_exhaustive()
    }
}

/// `postgres.on_publication_drift`: see [`PostgresConfig::on_publication_drift`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftPolicy {
    /// Keep running; evict the unpublished table's keys on every check.
    #[default]
    Evict,
    /// Stop the pipeline with the error (and its fix).
    Stop,
}

fn default_name() -> String {
    "cacheclear".into()
}
fn yes() -> bool {
    true
}
fn default_heartbeat_ms() -> u64 {
    10_000
}
fn default_watermark_ms() -> u64 {
    1_000
}
fn default_status_ms() -> u64 {
    1_000
}
fn default_max_txn_keys() -> usize {
    2_000_000
}
fn default_max_batch_keys() -> usize {
    20_000
}
fn default_in_flight() -> usize {
    4
}
fn default_queue() -> usize {
    4
}
fn default_shutdown_timeout_ms() -> u64 {
    5_000
}
fn default_publication_check_ms() -> u64 {
    5_000
}

impl PostgresConfig {
    /// A config with every default and this URL.
    pub fn new(url: impl Into<String>) -> PostgresConfig {
        PostgresConfig {
            url: url.into(),
            slot: default_name(),
            publication: default_name(),
            create_slot: true,
            failover_slot: false,
            create_publication: true,
            heartbeat_interval_ms: default_heartbeat_ms(),
            status_interval_ms: default_status_ms(),
            max_txn_keys: default_max_txn_keys(),
            max_batch_keys: default_max_batch_keys(),
            queue_batches: default_queue(),
            max_batches_in_flight: default_in_flight(),
            shutdown_timeout_ms: default_shutdown_timeout_ms(),
            publication_check_interval_ms: default_publication_check_ms(),
            on_publication_drift: DriftPolicy::default(),
            namespace: None,
            watermark_interval_ms: default_watermark_ms(),
            on_slot_lost: SlotLostPolicy::default(),
        }
    }

    /// Checks values that parse but make no sense. Errors name the field and the reason.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (rest, _) = cacheclear_pg_tls::split_url(&self.url, "postgres.url")?;
        rest.parse::<tokio_postgres::Config>().map_err(|e| {
            ConfigError::new(
                "postgres.url",
                format!("not a PostgreSQL connection string: {e}"),
            )
        })?;
        for (field, name) in [
            ("postgres.slot", &self.slot),
            ("postgres.publication", &self.publication),
        ] {
            if name.is_empty()
                || name.len() > 63
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "`{name}` must be 1-63 characters of a-z, 0-9 and _ (PostgreSQL's rule for slot names)"
                    ),
                ));
            }
        }
        if self.status_interval_ms == 0 {
            return Err(ConfigError::new(
                "postgres.status_interval_ms",
                "must be at least 1",
            ));
        }
        if self.namespace().is_empty() || self.namespace().contains(['{', '}']) {
            return Err(ConfigError::new(
                "postgres.namespace",
                format!(
                    "`{}` must be non-empty and contain neither `{{` nor `}}` (it is a Redis Cluster hash tag)",
                    self.namespace()
                ),
            ));
        }
        for (field, value) in [
            ("postgres.max_batch_keys", self.max_batch_keys),
            ("postgres.queue_batches", self.queue_batches),
            ("postgres.max_batches_in_flight", self.max_batches_in_flight),
            ("postgres.max_txn_keys", self.max_txn_keys),
        ] {
            if value == 0 {
                return Err(ConfigError::new(field, "must be at least 1"));
            }
        }
        Ok(())
    }

    /// The namespace in force: `namespace`, or the slot name.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(&self.slot)
    }

    /// `shutdown_timeout_ms` as a duration.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    /// `status_interval_ms` as a duration.
    pub fn status_interval(&self) -> Duration {
        Duration::from_millis(self.status_interval_ms)
    }
}
