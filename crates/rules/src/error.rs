//! Error types.

use crate::template::TemplateError;

/// A rule set that cannot be used: found by [`crate::Rules::compile`] (configuration) or by
/// [`crate::TableRules::check_replica_identity`] (configuration against the live table).
///
/// `rule` fields are 0-based indexes into the configuration slice (the n-th `[[rules]]` entry is
/// `rules[n-1]`); template columns are 1-based character positions. Every message names the rule,
/// table and template concerned and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// `table` is not `schema.table` or `table` with valid identifiers.
    #[error("rules[{rule}]: table `{table}` is not valid: {reason}")]
    InvalidTable {
        /// Rule index.
        rule: usize,
        /// The table as written.
        table: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two rules name the same table.
    #[error(
        "rules[{rule}]: table {table} already has a rule (rules[{first_rule}]); list all of its \
         key templates in one rule"
    )]
    DuplicateTable {
        /// Index of the second rule.
        rule: usize,
        /// Index of the first rule for the table.
        first_rule: usize,
        /// Qualified table name.
        table: String,
    },
    /// A rule with an empty `keys` list.
    #[error(
        "rules[{rule}] (table {table}): `keys` is empty; a rule needs at least one key template"
    )]
    NoKeys {
        /// Rule index.
        rule: usize,
        /// Qualified table name.
        table: String,
    },
    /// A key template that does not parse.
    #[error("rules[{rule}] (table {table}): key template `{template}` {error}")]
    Template {
        /// Rule index.
        rule: usize,
        /// Qualified table name.
        table: String,
        /// The template as written.
        template: String,
        /// The position and the problem.
        error: TemplateError,
    },
    /// The same template (same text and columns) twice in one rule.
    #[error("rules[{rule}] (table {table}): key template `{template}` is listed twice")]
    DuplicateTemplate {
        /// Rule index.
        rule: usize,
        /// Qualified table name.
        table: String,
        /// The template as written (second occurrence).
        template: String,
    },
    /// Two templates of different shapes that can produce the same key, so a column value could
    /// forge a key of the other template.
    #[error(
        "key templates {first} and {second} can both produce the key `{example}`: a column value \
         could stand in for the literal text of the other template and forge its keys. Make \
         their literal texts differ at a character outside `A-Z a-z 0-9 - . _ ~` (end each \
         literal prefix with `:`, for instance), or give keys of the same kind the same shape"
    )]
    OverlappingTemplates {
        /// The template configured first.
        first: Box<TemplateRef>,
        /// The other template.
        second: Box<TemplateRef>,
        /// A key both can produce (the shortest).
        example: String,
    },
    /// A template references a column the table does not have.
    #[error(
        "table {table}: key template `{template}` uses column `{column}`, which the table does \
         not have (its columns: {}); fix the template or the rule's table",
        .available.join(", ")
    )]
    UnknownColumn {
        /// Qualified table name.
        table: String,
        /// The template as written.
        template: String,
        /// The missing column.
        column: String,
        /// The table's columns.
        available: Vec<String>,
    },
    /// A template references a column the old row image does not carry under the table's
    /// REPLICA IDENTITY, so UPDATE and DELETE could not evict the old row's key.
    #[error(
        "table {table}: key template `{template}` uses column `{column}`, but under REPLICA \
         IDENTITY {identity} the old row image of an UPDATE or DELETE does not carry it, so the \
         old row's key could not be evicted. Fix: `{fix}`"
    )]
    ColumnNotInOldImage {
        /// Qualified table name.
        table: String,
        /// The template as written.
        template: String,
        /// The column the old image lacks.
        column: String,
        /// The identity, as [`crate::ReplicaIdentity`] displays it.
        identity: String,
        /// The SQL that fixes it: `ALTER TABLE <table> REPLICA IDENTITY FULL;`.
        fix: String,
    },
}

/// Where a template is configured, for [`RuleError::OverlappingTemplates`].
///
/// Displays as `` `item-{id}` (rules[1], table public.b) ``.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRef {
    /// Rule index.
    pub rule: usize,
    /// Qualified table name.
    pub table: String,
    /// The template as written.
    pub template: String,
}

impl std::fmt::Display for TemplateRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` (rules[{}], table {})",
            self.template, self.rule, self.table
        )
    }
}

/// A row image without the value of a column a template needs: its keys cannot be known.
///
/// The caller must then invalidate every key the table can produce
/// ([`crate::TableRules::scan_patterns`]); it never treats the column as NULL, which would skip
/// a key that may exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyBuildError {
    /// The column is an unchanged TOASTed value ([`crate::Column::UnchangedToast`]).
    #[error(
        "table {table}: key template `{template}` needs column `{column}`, which this row image \
         carries as an unchanged TOASTed value (not sent); its keys are unknown, so every key of \
         the table must be invalidated"
    )]
    UnchangedToast {
        /// Qualified table name.
        table: String,
        /// The template as written.
        template: String,
        /// The column without a value.
        column: String,
    },
    /// The row image does not carry the column ([`crate::Column::Absent`]).
    #[error(
        "table {table}: key template `{template}` needs column `{column}`, which this row image \
         does not carry; its keys are unknown, so every key of the table must be invalidated"
    )]
    Absent {
        /// Qualified table name.
        table: String,
        /// The template as written.
        template: String,
        /// The column without a value.
        column: String,
    },
}

impl KeyBuildError {
    /// The qualified table of the row.
    pub fn table(&self) -> &str {
        match self {
            KeyBuildError::UnchangedToast { table, .. } | KeyBuildError::Absent { table, .. } => {
                table
            }
        }
    }

    /// The column without a value.
    pub fn column(&self) -> &str {
        match self {
            KeyBuildError::UnchangedToast { column, .. } | KeyBuildError::Absent { column, .. } => {
                column
            }
        }
    }
}
