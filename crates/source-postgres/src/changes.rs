//! From decoded `pgoutput` messages to committed transactions' cache keys.
//!
//! [`ChangeMapper`] keeps the relation cache (every `Relation` message replaces its entry, so an
//! `ALTER TABLE` mid-stream — added, dropped, renamed or retyped columns — applies to the rows that
//! follow it without a restart) and the open transaction. Per row it asks the rules for keys:
//! INSERT → new row; UPDATE → old row (when the replica identity sends one) and new row; DELETE →
//! old row; TRUNCATE → every key of the table's rules.
//!
//! A row whose keys cannot be computed — a rule column that a later `ALTER TABLE` renamed away, an
//! unchanged TOAST value with no old image to take it from — is never skipped: the whole table's
//! keys are evicted instead ([`TableEviction`]), and the cause is logged.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cacheclear_protocol::{CommittedTxn, KeyArena, Lsn, Op, TableEviction};
use cacheclear_rules::{Column, RowImage, Rules, TableRules};

use crate::pgoutput::{Datum, Message, OldKind, Relation, Tuple};

/// Keys remembered per transaction for de-duplication (a hot category key touched by every row of
/// a bulk UPDATE is sent once). Bounded so a million-row transaction doesn't double its memory;
/// past it, duplicates are sent (harmless: invalidation is idempotent).
const DEDUP_CAPACITY: usize = 16 * 1024;

/// Turns a `pgoutput` message stream into [`CommittedTxn`]s. One per replication connection.
pub(crate) struct ChangeMapper {
    rules: Arc<Rules>,
    /// Partitions (by OID) of partitioned rule tables → the rule table (schema, table).
    partition_roots: HashMap<u32, (String, String)>,
    relations: HashMap<u32, RelationState>,
    open: Option<OpenTxn>,
    max_txn_keys: usize,
    scratch: Vec<String>,
}

struct RelationState {
    relation: Relation,
    /// `schema.table`, shared by every key run of this table.
    qualified: Arc<str>,
    /// The (schema, table) whose rules map its rows: its own name, or its partition root's.
    rule: Option<(String, String)>,
    /// Why this relation's old images no longer carry every column its rules read (its replica
    /// identity was reset, or a rule column was renamed away), when that is so: every UPDATE and
    /// DELETE without a full old image then evicts the table's keys.
    identity_gap: Option<String>,
    /// When the identity gap was last logged (the log repeats at most every [`GAP_LOG_EVERY`]).
    gap_logged: Option<std::time::Instant>,
}

/// How often the identity-gap error repeats while the gap lasts.
const GAP_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The prefix of the transactional logical message (`pg_logical_emit_message(true, …)`) by which
/// the publication watch asks for a table-wide eviction in WAL order; its content is the rule
/// table's qualified name (`schema.table`). Emitted after the table is published again, so the
/// eviction lands after every change that was not streamed.
pub(crate) const EVICT_TABLE_PREFIX: &str = "cacheclear.evict_table";

/// Why a table's keys were evicted as a whole instead of a row's keys: the `reason` label of
/// `cacheclear_table_fallbacks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FallbackReason {
    /// A row's keys could not be rendered (a rule column missing from the row, unchanged TOAST
    /// without an old image, a value that is not text).
    Unrenderable,
    /// A rendered key is over the key arena's limits.
    KeyTooLarge,
    /// The table's replica identity no longer sends the rule's columns in old images.
    ReplicaIdentity,
    /// The publication watch asked for it (the table left the publication, was re-created or
    /// swapped).
    PublicationDrift,
}

impl FallbackReason {
    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            FallbackReason::Unrenderable => "unrenderable_row",
            FallbackReason::KeyTooLarge => "key_too_large",
            FallbackReason::ReplicaIdentity => "replica_identity",
            FallbackReason::PublicationDrift => "publication_drift",
        }
    }
}

fn count_fallback(reason: FallbackReason) {
    metrics::counter!(crate::telemetry::TABLE_FALLBACKS, "reason" => reason.label()).increment(1);
}

struct OpenTxn {
    txn: CommittedTxn,
    seen: HashSet<String>,
    /// Tables evicted as a whole in this transaction (their rows add no more keys).
    whole: HashSet<u32>,
    /// Tables whose rows added keys (for the over-budget fallback).
    touched: HashSet<u32>,
    over_budget: bool,
    /// Keys already handed over in [`CommittedTxn::partial`] parts.
    handed_over: usize,
}

/// What the mapper made of one message.
#[derive(Debug)]
pub(crate) enum Mapped {
    /// Nothing to do yet (a row inside a transaction, a relation, a type ...).
    Nothing,
    /// A transaction committed; its evictions (possibly none) are ready.
    Committed(CommittedTxn),
    /// A non-transactional logical message (heartbeat) at this LSN, outside any transaction.
    Message(Lsn),
    /// A `Relation` message replaced a relation's entry (its schema or replica identity may have
    /// changed: the publication watch re-checks the catalog).
    Relation,
}

/// A message the mapper cannot place: a row for a relation it never saw, or a row outside a
/// transaction. The stream cannot continue safely; the source restarts from the slot.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// A change referenced a relation OID no `Relation` message introduced.
    #[error("change for relation OID {0} arrived before its Relation message")]
    UnknownRelation(u32),
    /// A change or Commit arrived with no open transaction.
    #[error("{0} arrived outside a transaction (no Begin)")]
    NoTransaction(&'static str),
    /// A row's column count differs from its Relation message.
    #[error("{table}: row has {got} columns, its Relation message has {want}")]
    ColumnCount {
        table: String,
        got: usize,
        want: usize,
    },
}

impl ChangeMapper {
    /// A mapper using `rules`. A transaction whose keys exceed `max_txn_keys` switches to evicting
    /// its tables as a whole (bounding memory: a key costs its length plus 4 bytes).
    pub(crate) fn new(rules: Arc<Rules>, max_txn_keys: usize) -> ChangeMapper {
        ChangeMapper {
            rules,
            partition_roots: HashMap::new(),
            relations: HashMap::new(),
            open: None,
            max_txn_keys,
            scratch: Vec::new(),
        }
    }

    /// Maps partition `oid` to its partitioned rule table (`schema`, `table`): its rows then
    /// evict that rule's keys. Call before the partition's `Relation` message is handled.
    pub(crate) fn set_partition_root(&mut self, oid: u32, schema: String, table: String) {
        self.partition_roots.insert(oid, (schema, table));
    }

    /// True when a rule names the table `schema.table` itself.
    pub(crate) fn has_rule(&self, schema: &str, table: &str) -> bool {
        self.rules.table(schema, table).is_some()
    }

    /// True while a transaction is open (between Begin and Commit).
    pub(crate) fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// The open transaction's keys so far as a [`CommittedTxn::partial`] part, once it holds at
    /// least `at_keys` keys (`None` before, and outside a transaction). The part's fence is
    /// Begin's `final_lsn` + 1 (see [`CommittedTxn::partial`]); its table-wide evictions stay
    /// with the transaction's last part. The transaction's key budget (`max_txn_keys`) counts
    /// the keys handed over too.
    pub(crate) fn take_part(&mut self, at_keys: usize) -> Option<CommittedTxn> {
        let open = self.open.as_mut()?;
        if open.txn.keys.len() < at_keys.max(1) {
            return None;
        }
        let keys = std::mem::take(&mut open.txn.keys);
        open.handed_over += keys.len();
        Some(CommittedTxn {
            xid: open.txn.xid,
            commit_lsn: Lsn(open.txn.commit_lsn.0.saturating_add(1)),
            commit_time_us: open.txn.commit_time_us,
            received_us: cacheclear_protocol::now_us(),
            keys,
            tables: Vec::new(),
            partial: true,
        })
    }

    /// Feeds one message.
    ///
    /// # Errors
    /// [`MapError`] when the stream is inconsistent (see its variants).
    pub(crate) fn handle(&mut self, message: Message) -> Result<Mapped, MapError> {
        match message {
            Message::Begin {
                final_lsn,
                commit_time_us,
                xid,
            } => {
                if let Some(open) = &self.open {
                    tracing::warn!(
                        xid = open.txn.xid,
                        "Begin without Commit; dropping the open transaction"
                    );
                }
                self.open = Some(OpenTxn {
                    txn: CommittedTxn {
                        xid,
                        commit_lsn: final_lsn,
                        commit_time_us,
                        received_us: 0,
                        keys: KeyArena::default(),
                        tables: Vec::new(),
                        partial: false,
                    },
                    seen: HashSet::new(),
                    whole: HashSet::new(),
                    touched: HashSet::new(),
                    over_budget: false,
                    handed_over: 0,
                });
                Ok(Mapped::Nothing)
            }
            Message::Commit {
                end_lsn,
                commit_time_us,
                ..
            } => {
                let mut open = self.open.take().ok_or(MapError::NoTransaction("Commit"))?;
                open.txn.commit_lsn = end_lsn;
                open.txn.commit_time_us = commit_time_us;
                open.txn.received_us = cacheclear_protocol::now_us();
                Ok(Mapped::Committed(open.txn))
            }
            Message::Relation(relation) => {
                // A rule names the table itself, or the partitioned table it is a partition of.
                let rule = if self
                    .rules
                    .table(&relation.namespace, &relation.name)
                    .is_some()
                {
                    Some((relation.namespace.clone(), relation.name.clone()))
                } else {
                    self.partition_roots.get(&relation.oid).cloned()
                };
                let is_partition = rule
                    .as_ref()
                    .is_some_and(|(s, n)| *s != relation.namespace || *n != relation.name);
                let identity_gap = rule
                    .as_ref()
                    .and_then(|(schema, name)| self.rules.table(schema, name))
                    .and_then(|rules| {
                        let e = check_relation(rules, &relation)?;
                        Some(if is_partition {
                            // The rule error's fix names the root; the partition needs its own.
                            crate::catalog::partition_gap(
                                &format!(
                                    "{}.{}",
                                    cacheclear_rules::quote_ident(&relation.namespace),
                                    cacheclear_rules::quote_ident(&relation.name)
                                ),
                                rules.qualified(),
                                &e,
                            )
                        } else {
                            e.to_string()
                        })
                    });
                let qualified: Arc<str> =
                    Arc::from(format!("{}.{}", relation.namespace, relation.name));
                if let Some(gap) = &identity_gap {
                    tracing::error!(
                        table = %qualified, error = %gap,
                        "the table's schema changed under its rule; its UPDATEs and DELETEs evict \
                         every key of the table until fixed"
                    );
                }
                let gap_logged = identity_gap.as_ref().map(|_| std::time::Instant::now());
                self.relations.insert(
                    relation.oid,
                    RelationState {
                        relation,
                        qualified,
                        rule,
                        identity_gap,
                        gap_logged,
                    },
                );
                Ok(Mapped::Relation)
            }
            Message::Insert { relation, new } => {
                self.row(relation, Op::Insert, &[(Image::New, &new, None)])?;
                Ok(Mapped::Nothing)
            }
            Message::Update { relation, old, new } => {
                let full_old = matches!(old, Some((OldKind::Full, _)));
                if !full_old && self.identity_gap_fallback(relation, Op::Update)? {
                    return Ok(Mapped::Nothing);
                }
                match &old {
                    Some((kind, old_tuple)) => self.row(
                        relation,
                        Op::Update,
                        &[
                            (Image::Old(*kind), old_tuple, None),
                            (Image::New, &new, Some(old_tuple)),
                        ],
                    )?,
                    None => self.row(relation, Op::Update, &[(Image::New, &new, None)])?,
                }
                Ok(Mapped::Nothing)
            }
            Message::Delete {
                relation,
                old: (kind, old),
            } => {
                if kind != OldKind::Full && self.identity_gap_fallback(relation, Op::Delete)? {
                    return Ok(Mapped::Nothing);
                }
                self.row(relation, Op::Delete, &[(Image::Old(kind), &old, None)])?;
                Ok(Mapped::Nothing)
            }
            Message::Truncate { relations, .. } => {
                for oid in relations {
                    self.evict_table(oid, Op::Truncate)?;
                }
                Ok(Mapped::Nothing)
            }
            Message::Message {
                transactional: false,
                lsn,
                ..
            } if self.open.is_none() => Ok(Mapped::Message(lsn)),
            Message::Message {
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == EVICT_TABLE_PREFIX => {
                self.evict_requested(&content)?;
                Ok(Mapped::Nothing)
            }
            Message::Message { .. } | Message::Origin { .. } | Message::Type { .. } => {
                Ok(Mapped::Nothing)
            }
        }
    }

    fn row(
        &mut self,
        oid: u32,
        op: Op,
        images: &[(Image, &Tuple, Option<&Tuple>)],
    ) -> Result<(), MapError> {
        let state = self
            .relations
            .get(&oid)
            .ok_or(MapError::UnknownRelation(oid))?;
        let open = self
            .open
            .as_mut()
            .ok_or(MapError::NoTransaction("a row change"))?;
        let Some(rules) = rules_of(&self.rules, state) else {
            return Ok(()); // published, but no rule maps it to keys
        };
        if open.whole.contains(&oid) {
            return Ok(());
        }
        if open.over_budget {
            // Past the key budget every further table is evicted as a whole too.
            push_table_eviction(open, oid, &state.qualified, op, rules);
            return Ok(());
        }
        self.scratch.clear();
        for &(image, tuple, toast_source) in images {
            if tuple.len() != state.relation.columns.len() {
                return Err(MapError::ColumnCount {
                    table: state.qualified.to_string(),
                    got: tuple.len(),
                    want: state.relation.columns.len(),
                });
            }
            let row = Row {
                relation: &state.relation,
                tuple,
                image,
                toast_source,
            };
            if let Err(e) = rules.keys_for(&row, &mut self.scratch) {
                tracing::warn!(
                    table = %state.qualified, ?op, error = %e,
                    "cannot compute this row's cache keys; evicting every key of the table instead"
                );
                count_fallback(FallbackReason::Unrenderable);
                let qualified = Arc::clone(&state.qualified);
                push_table_eviction(open, oid, &qualified, op, rules);
                return Ok(());
            }
        }
        // The old and new images of an UPDATE usually give the same keys: send each once.
        self.scratch.sort_unstable();
        self.scratch.dedup();
        open.touched.insert(oid);
        for key in self.scratch.drain(..) {
            if open.seen.contains(&key) {
                continue;
            }
            if !open.txn.keys.push(&state.qualified, op, &key) {
                // A key over the arena's limits (1 MiB, or 4 GiB of key text in the
                // transaction) is never dropped: the table's keys are evicted instead.
                tracing::warn!(
                    table = %state.qualified, ?op, key_bytes = key.len(),
                    "a cache key is too large to send; evicting every key of the table instead"
                );
                count_fallback(FallbackReason::KeyTooLarge);
                let qualified = Arc::clone(&state.qualified);
                push_table_eviction(open, oid, &qualified, op, rules);
                return Ok(()); // dropping the drain empties the scratch list
            }
            if open.seen.len() < DEDUP_CAPACITY {
                open.seen.insert(key);
            }
        }
        if open.handed_over + open.txn.keys.len() > self.max_txn_keys && !open.over_budget {
            tracing::warn!(
                xid = open.txn.xid,
                keys = open.handed_over + open.txn.keys.len(),
                max_txn_keys = self.max_txn_keys,
                "transaction exceeds the per-transaction key budget; evicting its tables as a whole"
            );
            open.over_budget = true;
            open.txn.keys.clear();
            open.seen.clear();
            for t in std::mem::take(&mut open.touched) {
                let Some(st) = self.relations.get(&t) else {
                    continue;
                };
                if let Some(r) = rules_of(&self.rules, st) {
                    push_table_eviction(open, t, &st.qualified, op, r);
                }
            }
        }
        Ok(())
    }

    /// When `oid`'s replica identity no longer carries its rules' columns, evicts the table's keys
    /// for this UPDATE or DELETE (whose old image cannot give the old keys) and returns `true`.
    fn identity_gap_fallback(&mut self, oid: u32, op: Op) -> Result<bool, MapError> {
        let state = self
            .relations
            .get_mut(&oid)
            .ok_or(MapError::UnknownRelation(oid))?;
        let Some(gap) = &state.identity_gap else {
            return Ok(false);
        };
        let Some(rules) = rules_of(&self.rules, state) else {
            return Ok(false);
        };
        let open = self
            .open
            .as_mut()
            .ok_or(MapError::NoTransaction("a row change"))?;
        if state
            .gap_logged
            .is_none_or(|at| at.elapsed() >= GAP_LOG_EVERY)
        {
            state.gap_logged = Some(std::time::Instant::now());
            tracing::error!(
                table = %state.qualified, ?op, error = %gap,
                "old rows no longer carry the rule's columns; evicting every key of the table \
                 (repeats at most every 60 s while it lasts)"
            );
        }
        count_fallback(FallbackReason::ReplicaIdentity);
        push_table_eviction(open, oid, &state.qualified, op, rules);
        Ok(true)
    }

    /// A table-wide eviction the publication watch requested through the WAL
    /// ([`EVICT_TABLE_PREFIX`]); `content` is the rule table's `schema.table`.
    fn evict_requested(&mut self, content: &[u8]) -> Result<(), MapError> {
        let open = self
            .open
            .as_mut()
            .ok_or(MapError::NoTransaction("a logical message"))?;
        let Ok(table) = std::str::from_utf8(content) else {
            tracing::warn!("ignoring a {EVICT_TABLE_PREFIX} message that is not UTF-8");
            return Ok(());
        };
        let Some(rules) = self.rules.tables().find(|t| t.qualified() == table) else {
            tracing::warn!(
                table,
                "ignoring a {EVICT_TABLE_PREFIX} message for a table no rule names"
            );
            return Ok(());
        };
        count_fallback(FallbackReason::PublicationDrift);
        tracing::info!(table, "evicting every key of the table (publication watch)");
        open.txn.tables.push(TableEviction {
            table: Arc::from(table),
            op: Op::Truncate,
            patterns: rules.scan_patterns(),
        });
        Ok(())
    }

    fn evict_table(&mut self, oid: u32, op: Op) -> Result<(), MapError> {
        let state = self
            .relations
            .get(&oid)
            .ok_or(MapError::UnknownRelation(oid))?;
        let open = self
            .open
            .as_mut()
            .ok_or(MapError::NoTransaction("Truncate"))?;
        if let Some(rules) = rules_of(&self.rules, state) {
            push_table_eviction(open, oid, &state.qualified, op, rules);
        }
        Ok(())
    }
}

fn push_table_eviction(open: &mut OpenTxn, oid: u32, table: &Arc<str>, op: Op, rules: &TableRules) {
    if open.whole.insert(oid) {
        open.txn.tables.push(TableEviction {
            table: Arc::clone(table),
            op,
            patterns: rules.scan_patterns(),
        });
    }
}

/// Why a relation's schema no longer supports its rule, when it does not: a renamed or dropped
/// column, or a replica identity that stopped carrying a rule column in old images. The UPDATEs and
/// DELETEs that follow fall back to table-wide eviction, so nothing is lost meanwhile.
fn check_relation(rules: &TableRules, relation: &Relation) -> Option<cacheclear_rules::RuleError> {
    let columns: Vec<String> = relation.columns.iter().map(|c| c.name.clone()).collect();
    let identity = identity_of(relation);
    rules.check_replica_identity(&identity, &columns).err()
}

/// The rules that map `state`'s rows (its own, or its partition root's).
fn rules_of<'r>(rules: &'r Rules, state: &RelationState) -> Option<&'r TableRules> {
    let (schema, table) = state.rule.as_ref()?;
    rules.table(schema, table)
}

/// The replica identity a `Relation` message describes.
pub(crate) fn identity_of(relation: &Relation) -> cacheclear_rules::ReplicaIdentity {
    use cacheclear_rules::ReplicaIdentity;
    let key_columns = || {
        relation
            .columns
            .iter()
            .filter(|c| c.key)
            .map(|c| c.name.clone())
            .collect()
    };
    match relation.replica_identity {
        b'f' => ReplicaIdentity::Full,
        b'n' => ReplicaIdentity::Nothing,
        b'i' => ReplicaIdentity::Index {
            key_columns: key_columns(),
        },
        _ => ReplicaIdentity::Default {
            key_columns: key_columns(),
        },
    }
}

#[derive(Clone, Copy)]
enum Image {
    New,
    Old(OldKind),
}

/// One row image as the rules see it.
struct Row<'a> {
    relation: &'a Relation,
    tuple: &'a Tuple,
    image: Image,
    /// For a new image: the old image, where unchanged TOAST values can be read from.
    toast_source: Option<&'a Tuple>,
}

impl RowImage for Row<'_> {
    fn column(&self, name: &str) -> Column<'_> {
        let Some(i) = self.relation.columns.iter().position(|c| c.name == name) else {
            return Column::Absent;
        };
        if matches!(self.image, Image::Old(OldKind::Key)) && !self.relation.columns[i].key {
            // A 'K' image sends non-identity columns as NULL: they are unknown, not NULL.
            return Column::Absent;
        }
        datum_column(&self.tuple[i], self.toast_source.and_then(|t| t.get(i)))
    }
}

fn datum_column<'a>(datum: &'a Datum, toast_source: Option<&'a Datum>) -> Column<'a> {
    match datum {
        Datum::Null => Column::Null,
        Datum::Text(b) => match std::str::from_utf8(b) {
            Ok(s) => Column::Text(s),
            Err(_) => Column::Absent,
        },
        Datum::Binary(_) => Column::Absent,
        // pgoutput did not send the value because it did not change: take it from the old image
        // when there is one (REPLICA IDENTITY FULL sends old values in full). Never NULL.
        Datum::UnchangedToast => match toast_source {
            Some(d @ Datum::Text(_)) => datum_column(d, None),
            _ => Column::UnchangedToast,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Datum, RelationColumn};
    use bytes::Bytes;
    use cacheclear_rules::RuleConfig;

    fn rules() -> Arc<Rules> {
        Arc::new(
            Rules::compile(&[
                RuleConfig {
                    table: "public.product".into(),
                    keys: vec![
                        "product:{id}".into(),
                        "category:{category_id}:products".into(),
                    ],
                },
                RuleConfig {
                    table: "public.page".into(),
                    keys: vec!["page:{id}".into()],
                },
            ])
            .unwrap(),
        )
    }

    fn relation(oid: u32, name: &str, identity: u8) -> Message {
        let col = |name: &str, key: bool| RelationColumn {
            name: name.into(),
            key,
            type_oid: 23,
            type_modifier: -1,
        };
        Message::Relation(Relation {
            oid,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: identity,
            columns: vec![
                col("id", true),
                col("category_id", false),
                col("body", false),
            ],
        })
    }

    fn t(v: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(v.as_bytes()))
    }

    fn begin(m: &mut ChangeMapper) {
        m.handle(Message::Begin {
            final_lsn: Lsn(10),
            commit_time_us: 0,
            xid: 7,
        })
        .unwrap();
    }

    fn commit(m: &mut ChangeMapper) -> CommittedTxn {
        match m
            .handle(Message::Commit {
                commit_lsn: Lsn(10),
                end_lsn: Lsn(20),
                commit_time_us: 5,
            })
            .unwrap()
        {
            Mapped::Committed(txn) => txn,
            other => panic!("expected a commit, got {other:?}"),
        }
    }

    #[test]
    fn update_with_unchanged_toast_and_key_images() {
        let mut m = ChangeMapper::new(rules(), 1000);
        m.handle(relation(1, "product", b'f')).unwrap();
        begin(&mut m);
        // Category moves 3 → 7; `body` is unchanged TOAST in the new row.
        m.handle(Message::Update {
            relation: 1,
            old: Some((OldKind::Full, vec![t("5"), t("3"), t("long")])),
            new: vec![t("5"), t("7"), Datum::UnchangedToast],
        })
        .unwrap();
        let txn = commit(&mut m);
        assert_eq!(
            txn.commit_lsn,
            Lsn(20),
            "the fence/confirm LSN is the commit's end"
        );
        let mut keys: Vec<&str> = txn.keys.iter().collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["category:3:products", "category:7:products", "product:5"]
        );
        assert!(txn.tables.is_empty());

        // A 'K' image carries only the key: category_id is unknown there, so the row's keys
        // cannot be computed and the table is evicted as a whole (never read as NULL).
        begin(&mut m);
        m.handle(Message::Delete {
            relation: 1,
            old: (OldKind::Key, vec![t("5"), Datum::Null, Datum::Null]),
        })
        .unwrap();
        let txn = commit(&mut m);
        assert!(txn.keys.is_empty());
        assert_eq!(txn.tables.len(), 1);
        assert_eq!(&*txn.tables[0].table, "public.product");
        assert_eq!(txn.tables[0].op, Op::Delete);
    }

    #[test]
    fn over_budget_transactions_evict_whole_tables() {
        let mut m = ChangeMapper::new(rules(), 3);
        m.handle(relation(1, "product", b'f')).unwrap();
        m.handle(relation(2, "page", b'f')).unwrap();
        begin(&mut m);
        for id in 0..5 {
            m.handle(Message::Insert {
                relation: 1,
                new: vec![t(&id.to_string()), t("1"), t("")],
            })
            .unwrap();
        }
        // A table first touched after the budget is exceeded is evicted whole as well.
        m.handle(Message::Insert {
            relation: 2,
            new: vec![t("9"), Datum::Null, t("")],
        })
        .unwrap();
        let txn = commit(&mut m);
        assert!(txn.keys.is_empty(), "keys dropped once over budget");
        let mut tables: Vec<&str> = txn.tables.iter().map(|e| &*e.table).collect();
        tables.sort_unstable();
        assert_eq!(tables, ["public.page", "public.product"]);
    }

    /// A transaction is handed over in partial parts as its keys reach the part size: each part
    /// carries Begin's final LSN + 1 as its fence, keys already handed over are not sent again,
    /// the last part keeps the rest and the table-wide evictions, and the key budget counts the
    /// keys handed over.
    #[test]
    fn large_transactions_are_handed_over_in_partial_parts() {
        let mut m = ChangeMapper::new(rules(), 1000);
        m.handle(relation(1, "product", b'f')).unwrap();
        m.handle(relation(2, "page", b'f')).unwrap();
        assert!(m.take_part(1).is_none(), "no open transaction");
        begin(&mut m);
        // Every row: product:<id>, and category:1:products (sent once per transaction); a part
        // is taken at 3 keys.
        let insert = |m: &mut ChangeMapper| {
            let mut parts = Vec::new();
            for id in 0..4 {
                m.handle(Message::Insert {
                    relation: 1,
                    new: vec![t(&id.to_string()), t("1"), t("")],
                })
                .unwrap();
                parts.extend(m.take_part(3));
            }
            parts
        };
        let parts = insert(&mut m);
        m.handle(Message::Truncate {
            relations: vec![2],
            cascade: false,
            restart_identity: false,
        })
        .unwrap();
        assert!(
            m.take_part(3).is_none(),
            "two keys held: below the part size"
        );
        let last = commit(&mut m);
        let keys = |t: &CommittedTxn| t.keys.iter().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(parts.len(), 1);
        assert!(parts[0].partial && parts[0].xid == 7 && parts[0].tables.is_empty());
        assert_eq!(parts[0].commit_lsn, Lsn(11), "Begin's final LSN + 1");
        assert_eq!(
            keys(&parts[0]),
            ["category:1:products", "product:0", "product:1"]
        );
        assert!(!last.partial);
        assert_eq!(last.commit_lsn, Lsn(20), "the commit's end LSN");
        assert_eq!(keys(&last), ["product:2", "product:3"]);
        assert_eq!(last.tables.len(), 1);

        // The budget (4 keys) counts the 3 handed over: the 5th key sends the table whole.
        let mut m = ChangeMapper::new(rules(), 4);
        m.handle(relation(1, "product", b'f')).unwrap();
        begin(&mut m);
        let parts = insert(&mut m);
        let last = commit(&mut m);
        assert_eq!(parts.len(), 1);
        assert!(last.keys.is_empty());
        assert_eq!(&*last.tables[0].table, "public.product");
    }

    #[test]
    fn a_key_too_large_to_send_evicts_its_table() {
        let mut m = ChangeMapper::new(rules(), 1000);
        m.handle(relation(1, "product", b'f')).unwrap();
        begin(&mut m);
        // A 2 MiB id renders a key over the arena's 1 MiB limit: never dropped silently.
        let huge = "9".repeat(2 << 20);
        m.handle(Message::Insert {
            relation: 1,
            new: vec![t(&huge), t("1"), t("")],
        })
        .unwrap();
        let txn = commit(&mut m);
        assert_eq!(txn.tables.len(), 1, "the table is evicted instead");
        assert_eq!(&*txn.tables[0].table, "public.product");
        assert!(txn.keys.iter().all(|k| k.len() < 1 << 20));
    }

    #[test]
    fn rows_outside_a_transaction_or_of_unknown_relations_are_errors() {
        let mut m = ChangeMapper::new(rules(), 10);
        assert!(matches!(
            m.handle(Message::Insert {
                relation: 9,
                new: vec![]
            }),
            Err(MapError::UnknownRelation(9))
        ));
        m.handle(relation(1, "product", b'f')).unwrap();
        assert!(matches!(
            m.handle(Message::Insert {
                relation: 1,
                new: vec![t("1"), t("1"), t("")]
            }),
            Err(MapError::NoTransaction(_))
        ));
        begin(&mut m);
        assert!(matches!(
            m.handle(Message::Insert {
                relation: 1,
                new: vec![t("1")]
            }),
            Err(MapError::ColumnCount {
                got: 1,
                want: 3,
                ..
            })
        ));
    }
}
