//! Column types of the rule tables: declared in a rule (`[rules.types]`) or read from
//! PostgreSQL (`[postgres] url`) at start, and the start-up refusal when a Debezium key value
//! could not be read without them.

use std::collections::{BTreeMap, HashMap};

use cacheclear_protocol::ConfigError;
use cacheclear_rules::{ReplicaIdentity, RuleConfig, Rules};

use crate::config::{BeforeImages, DebeziumConfig};
use crate::pgtext::{Encoding, PgType};

/// One `[[rules]]` entry of `invalidator.toml`: the pipeline's rule ([`RuleConfig`]: `table`,
/// `keys`) plus the optional PostgreSQL types of its template columns.
///
/// ```toml
/// [[rules]]
/// table = "public.sale"
/// keys = ["sale:{sku}:{day}"]
/// [rules.types]            # column → PostgreSQL type, as format_type() prints it
/// sku = "uuid"
/// day = "date"
/// ```
///
/// Types are needed when Debezium events carry no schema (`debezium.schemas_enable = false`)
/// or the connector's modes lose what the schema would say (`decimal_handling_mode =
/// "double"`, `time_precision_mode = "connect"`), unless `[postgres] url` is set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct InvalidatorRule {
    /// The table (`schema.table`, or `table` for schema `public`), as in [`RuleConfig::table`].
    pub table: String,
    /// Key templates, as in [`RuleConfig::keys`].
    pub keys: Vec<String>,
    /// Template column → PostgreSQL type name (`date`, `numeric(10,2)`, `timestamptz`,
    /// `timestamp(3)`, `uuid`, `text`, `enum`, …). Overrides the type read from `[postgres]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub types: BTreeMap<String, String>,
}

impl InvalidatorRule {
    /// A rule without declared types.
    pub fn new(table: impl Into<String>, keys: Vec<String>) -> InvalidatorRule {
        InvalidatorRule {
            table: table.into(),
            keys,
            types: BTreeMap::new(),
        }
    }

    /// Declares the PostgreSQL type of `column` ([`InvalidatorRule::types`]).
    #[must_use]
    pub fn with_type(mut self, column: impl Into<String>, pg_type: impl Into<String>) -> Self {
        self.types.insert(column.into(), pg_type.into());
        self
    }

    /// The pipeline's view of this rule (without the types).
    pub fn rule_config(&self) -> RuleConfig {
        RuleConfig {
            table: self.table.clone(),
            keys: self.keys.clone(),
        }
    }
}

impl From<RuleConfig> for InvalidatorRule {
    fn from(r: RuleConfig) -> InvalidatorRule {
        InvalidatorRule::new(r.table, r.keys)
    }
}

/// `[postgres]` of `invalidator.toml` (optional): the database the Debezium connector reads, from
/// which the rule tables' column types and replica identities are read once at start.
///
/// ```toml
/// [postgres]
/// url = "postgres://reader@db:5432/shop"   # any user that can read the catalog
/// ```
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/dbname` or a libpq key=value string.
    pub url: String,
}

/// `Debug` with the URL's password shown as `***`.
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &cacheclear_protocol::redact_url(&self.url))
            .finish()
    }
}

impl PostgresConfig {
    /// A `[postgres]` section with this URL.
    pub fn new(url: impl Into<String>) -> PostgresConfig {
        PostgresConfig { url: url.into() }
    }
}

/// Known PostgreSQL types: `schema.table` → column → type.
#[derive(Debug, Clone, Default)]
pub(crate) struct ColumnTypes {
    tables: HashMap<String, HashMap<String, PgType>>,
}

impl ColumnTypes {
    /// The type of `column` of `table` (`schema.table`), when known.
    pub(crate) fn get(&self, table: &str, column: &str) -> Option<&PgType> {
        self.tables.get(table)?.get(column)
    }

    fn insert(&mut self, table: &str, column: &str, ty: PgType) {
        self.tables
            .entry(table.to_owned())
            .or_default()
            .insert(column.to_owned(), ty);
    }
}

/// What the catalog says about one rule table.
pub(crate) struct CatalogTable {
    /// Column name → `format_type()` text (`enum` for enum types; a domain's base type).
    pub(crate) columns: Vec<(String, String)>,
    /// The table's replica identity.
    pub(crate) identity: ReplicaIdentity,
}

/// Reads every rule table's columns and replica identity from PostgreSQL.
///
/// # Errors
/// A [`ConfigError`] on `postgres.url`: the connection or the query failed (the URL is
/// redacted), or a rule table does not exist.
pub(crate) async fn read_catalog(
    url: &str,
    rules: &Rules,
) -> Result<HashMap<String, CatalogTable>, ConfigError> {
    let shown = cacheclear_protocol::redact_url(url);
    let fail = |what: String| ConfigError::new("postgres.url", format!("{shown}: {what}"));
    // TLS as libpq's parameters say (`sslmode`, `sslrootcert`, …), like `cacheclear run`.
    let client = cacheclear_pg_tls::connect(url, "postgres.url")
        .await
        .map_err(|e| match e {
            cacheclear_pg_tls::ConnectError::Config(c) => c,
            other => ConfigError::new(
                "postgres.url",
                format!("cannot read the rule tables' column types: {other}"),
            ),
        })?;
    let (schemas, names): (Vec<String>, Vec<String>) = rules
        .tables()
        .map(|t| (t.schema().to_owned(), t.name().to_owned()))
        .unzip();
    let rows = client
        .query(
            "SELECT t.schema, t.name, c.oid IS NOT NULL, coalesce(c.relreplident::text, 'd'),
                    array(SELECT a.attname::text FROM pg_attribute a
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                          ORDER BY a.attnum),
                    array(SELECT CASE ty.typtype
                                   WHEN 'e' THEN 'enum'
                                   WHEN 'd' THEN format_type(ty.typbasetype, ty.typtypmod)
                                   ELSE format_type(a.atttypid, a.atttypmod) END
                          FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                          ORDER BY a.attnum),
                    array(SELECT a.attname::text FROM pg_index i
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                          WHERE i.indrelid = c.oid
                            AND CASE c.relreplident WHEN 'd' THEN i.indisprimary
                                                    WHEN 'i' THEN i.indisreplident
                                                    ELSE false END)
             FROM unnest($1::text[], $2::text[]) AS t(schema, name)
             LEFT JOIN pg_namespace n ON n.nspname = t.schema
             LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.name
                                 AND c.relkind IN ('r', 'p')",
            &[&schemas, &names],
        )
        .await
        .map_err(|e| fail(format!("reading the rule tables' columns: {e}")))?;
    drop(client);
    let mut out = HashMap::new();
    for row in rows {
        let (schema, name, exists, ident): (String, String, bool, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let qualified = format!("{schema}.{name}");
        if !exists {
            return Err(fail(format!("rule table {qualified} does not exist there")));
        }
        let names: Vec<String> = row.get(4);
        let types: Vec<String> = row.get(5);
        let keys: Vec<String> = row.get(6);
        let identity = ReplicaIdentity::from_pg_code(ident.bytes().next().unwrap_or(b'd'), keys)
            .ok_or_else(|| fail(format!("{qualified}: unknown replica identity `{ident}`")))?;
        out.insert(
            qualified,
            CatalogTable {
                columns: names.into_iter().zip(types).collect(),
                identity,
            },
        );
    }
    Ok(out)
}

/// Resolves every template column's type from the rules' declarations and the catalog (the
/// declaration wins), checks the replica identities against `before_images = "full"`, and refuses
/// to start when a type is needed ([`DebeziumConfig::needs_column_types`]) and unknown, or known
/// and not renderable under the connector's modes.
///
/// # Errors
/// A [`ConfigError`] naming the rule, table, template and column, and the fixes.
pub(crate) fn resolve(
    rules_cfg: &[InvalidatorRule],
    rules: &Rules,
    debezium: &DebeziumConfig,
    catalog: Option<&HashMap<String, CatalogTable>>,
) -> Result<ColumnTypes, ConfigError> {
    let mut types = ColumnTypes::default();
    let modes = debezium.modes();
    for table in rules.tables() {
        let rule = table.rule_index();
        let field = format!("rules[{rule}]");
        let declared = rules_cfg.get(rule).map(|r| &r.types);
        let from_catalog = catalog.and_then(|c| c.get(table.qualified()));
        if let (Some(cat), BeforeImages::Full) = (from_catalog, debezium.before_images) {
            let names: Vec<String> = cat.columns.iter().map(|(n, _)| n.clone()).collect();
            table
                .check_replica_identity(&cat.identity, &names)
                .map_err(|e| {
                    ConfigError::new(
                        field.clone(),
                        format!(
                            "{e} (read from [postgres] url; with debezium.before_images = \"full\" \
                             Debezium's `before` must carry every template column, or set \
                             before_images = \"default\" to evict the table when it does not)"
                        ),
                    )
                })?;
        }
        for (column, _) in declared.into_iter().flatten() {
            if !table.columns().contains(column.as_str()) {
                return Err(ConfigError::new(
                    format!("{field}.types.{column}"),
                    format!(
                        "table {}: `{column}` is not a column of any key template ({})",
                        table.qualified(),
                        table
                            .templates()
                            .iter()
                            .map(|t| t.source())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        for template in table.templates() {
            for column in template.columns() {
                let (name, source) = match declared.and_then(|d| d.get(column)) {
                    Some(t) => (Some(t.clone()), format!("{field}.types.{column}")),
                    None => (
                        from_catalog.and_then(|c| {
                            c.columns
                                .iter()
                                .find(|(n, _)| n == column)
                                .map(|(_, t)| t.clone())
                        }),
                        "postgres.url".to_owned(),
                    ),
                };
                let Some(name) = name else {
                    if let Some(why) = debezium.needs_column_types() {
                        return Err(ConfigError::new(
                            field.clone(),
                            format!(
                                "table {}, key template `{}`, column `{column}`: its PostgreSQL type \
                                 is unknown, and with {why} the Debezium value cannot be rendered \
                                 the way PostgreSQL prints it (a date would become a day count). \
                                 Either set [postgres] url = \"postgres://…\" (the column types are \
                                 read at start), or declare it in the rule: [rules.types] {column} = \
                                 \"<type>\" (e.g. \"date\", \"numeric(10,2)\", \"timestamptz\")",
                                table.qualified(),
                                template.source()
                            ),
                        ));
                    }
                    continue;
                };
                let ty = PgType::parse(&name).map_err(|r| {
                    ConfigError::new(
                        source.clone(),
                        format!(
                            "table {}, key template `{}`, column `{column}`: {r}",
                            table.qualified(),
                            template.source()
                        ),
                    )
                })?;
                Encoding::from_type(&ty, &modes).map_err(|r| {
                    ConfigError::new(
                        source.clone(),
                        format!(
                            "table {}, key template `{}`, column `{column}` ({name}): {r}",
                            table.qualified(),
                            template.source()
                        ),
                    )
                })?;
                types.insert(table.qualified(), column, ty);
            }
        }
    }
    Ok(types)
}
