//! Key rules: which cache keys a PostgreSQL row change invalidates.
//!
//! A rule names a table and key templates over its columns. [`Rules::compile`] checks and
//! pre-parses them once; on the invalidation hot path [`TableRules::keys_for`] turns a row image
//! into keys with one allocation per key and no other work than copying and escaping.
//!
//! ```toml
//! [[rules]]
//! table = "public.product"          # "schema.table"; a bare "product" means schema "public"
//! keys = ["product:{id}", "category:{category_id}:products"]
//! ```
//!
//! ```
//! use cacheclear_rules::{Column, ReplicaIdentity, RuleConfig, Rules};
//!
//! let rules = Rules::compile(&[RuleConfig {
//!     table: "public.product".into(),
//!     keys: vec!["product:{id}".into(), "category:{category_id}:products".into()],
//! }])?;
//! let product = rules.table("public", "product").expect("configured");
//!
//! // At startup: every template column must be in the old row image.
//! let columns = ["id", "name", "price", "category_id"].map(String::from);
//! product.check_replica_identity(&ReplicaIdentity::Full, &columns)?;
//!
//! // UPDATE product SET category_id = 7 WHERE id = 42 (it was 3): evict the keys of both images.
//! let old = [("id", Some("42")), ("category_id", Some("3"))];
//! let new = [("id", Some("42")), ("category_id", Some("7"))];
//! let mut keys = Vec::new();
//! product.keys_for(&old, &mut keys)?;
//! product.keys_for(&new, &mut keys)?;
//! keys.sort();
//! keys.dedup();
//! assert_eq!(keys, ["category:3:products", "category:7:products", "product:42"]);
//!
//! // Values are escaped, so a value can never forge another key.
//! let mut keys = Vec::new();
//! product.keys_for(&[("id", Some("1}:x")), ("category_id", None)], &mut keys)?;
//! assert_eq!(keys, ["product:1%7D%3Ax"]); // a NULL category has no listing key
//!
//! // TRUNCATE, or a row whose keys are unknown: SCAN for these and evict what they match.
//! assert_eq!(product.scan_patterns(), ["{product:*}*", "{category:*:products}*"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Escaping
//! Column values (their pgoutput text form) are percent-encoded by [`encode_value`]: the RFC 3986
//! unreserved characters `A-Z a-z 0-9 - . _ ~` are kept, every other byte becomes `%XX` (upper-case
//! hex), including `%` itself, `:`, `{`, `}`, glob metacharacters, spaces, control characters and
//! every byte of a non-ASCII character. Literal text in templates may not contain `{`, `}` or `%`,
//! and between two placeholders it must contain a character outside that alphabet (such as `:`).
//! Hence a value can neither end its placeholder early nor break the Redis Cluster hash tag
//! `{K}`, one template maps distinct value tuples to distinct keys ([`Template::decode_key`] reads
//! them back), and [`Rules::compile`] proves that templates of different shapes never produce a
//! common key.

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod error;
mod escape;
mod identity;
mod overlap;
mod row;
mod template;

use std::collections::{BTreeSet, HashMap};

pub use error::{KeyBuildError, RuleError, TemplateRef};
pub use escape::{decode_value, encode_value, glob_escape, is_encoded_alphabet, is_unreserved};
pub use identity::{ReplicaIdentity, quote_ident};
pub use row::{Column, MapRow, RowImage};
pub use template::{Segment, Template, TemplateError, TemplateProblem};

use template::Missing;

/// One `[[rules]]` entry of the configuration, as written (deserialized by the CLI).
///
/// `table` is `"schema.table"` or `"table"` (schema `public`); names follow SQL: unquoted
/// `[a-z_][a-z0-9_$]*`, or double-quoted for anything else (`"\"My Shop\".product"`). `keys` are
/// [`Template`]s. Unknown fields are rejected so that typos do not pass silently.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The table whose row changes invalidate `keys`.
    pub table: String,
    /// Key templates such as `product:{id}`; at least one.
    pub keys: Vec<String>,
}

/// A compiled, immutable rule set: the tables that matter and their parsed templates.
/// `Send + Sync`; share it behind an `Arc`.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    tables: Vec<TableRules>,
    /// schema → table name → index in `tables` (two levels, so lookups take `&str`s without
    /// building a qualified name).
    index: HashMap<String, HashMap<String, usize>>,
}

impl Rules {
    /// Checks and compiles `configs`.
    ///
    /// # Errors
    /// The first problem found, naming the rule index, table, template and what to change
    /// ([`RuleError`]): an invalid table name, a table named by two rules, a rule without keys,
    /// a template that does not parse ([`TemplateProblem`]: unknown syntax, empty placeholder,
    /// brace in literal text, placeholders not separated by a separator char, ...), a template
    /// listed twice, or two templates of different shapes that can produce the same key.
    ///
    /// ```
    /// use cacheclear_rules::{RuleConfig, RuleError, Rules};
    /// let cfg = |table: &str, keys: &[&str]| RuleConfig {
    ///     table: table.into(),
    ///     keys: keys.iter().map(|k| k.to_string()).collect(),
    /// };
    /// let err = Rules::compile(&[cfg("product", &["product:{id"])]).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "rules[0] (table public.product): key template `product:{id` at column 9: \
    ///      `{` opens a placeholder that is never closed with `}`"
    /// );
    /// let err = Rules::compile(&[cfg("a", &["item-{id}"]), cfg("b", &["item-{id}-detail"])]);
    /// assert!(matches!(err, Err(RuleError::OverlappingTemplates { .. })));
    /// ```
    pub fn compile(configs: &[RuleConfig]) -> Result<Rules, RuleError> {
        let mut rules = Rules::default();
        for (rule, config) in configs.iter().enumerate() {
            let table = TableRules::compile(rule, config)?;
            if let Some(&first) = rules
                .index
                .get(&table.schema)
                .and_then(|names| names.get(&table.name))
            {
                return Err(RuleError::DuplicateTable {
                    rule,
                    first_rule: rules.tables[first].rule,
                    table: table.qualified,
                });
            }
            rules
                .index
                .entry(table.schema.clone())
                .or_default()
                .insert(table.name.clone(), rules.tables.len());
            rules.tables.push(table);
        }
        rules.check_overlaps()?;
        Ok(rules)
    }

    /// Proves that templates of different shapes never produce a common key.
    fn check_overlaps(&self) -> Result<(), RuleError> {
        // One representative per shape; same-shape templates share keys on purpose.
        let mut shapes: Vec<(&TableRules, &Template)> = Vec::new();
        for table in &self.tables {
            for template in &table.templates {
                if !shapes.iter().any(|(_, t)| t.same_shape(template)) {
                    shapes.push((table, template));
                }
            }
        }
        let tokens: Vec<_> = shapes.iter().map(|(_, t)| t.tokens()).collect();
        for (i, (ta, a)) in shapes.iter().enumerate() {
            for (j, (tb, b)) in shapes.iter().enumerate().skip(i + 1) {
                if obviously_disjoint(&tokens[i], &tokens[j]) {
                    continue;
                }
                if let Some(example) = overlap::witness(&tokens[i], &tokens[j]) {
                    return Err(RuleError::OverlappingTemplates {
                        first: Box::new(TemplateRef {
                            rule: ta.rule,
                            table: ta.qualified.clone(),
                            template: a.source().to_owned(),
                        }),
                        second: Box::new(TemplateRef {
                            rule: tb.rule,
                            table: tb.qualified.clone(),
                            template: b.source().to_owned(),
                        }),
                        example,
                    });
                }
            }
        }
        Ok(())
    }

    /// The rules of table `schema`.`name` (exact names as PostgreSQL reports them, e.g. in a
    /// pgoutput Relation message), or `None` if no rule names it: its changes invalidate nothing.
    pub fn table(&self, schema: &str, name: &str) -> Option<&TableRules> {
        let i = *self.index.get(schema)?.get(name)?;
        self.tables.get(i)
    }

    /// All configured tables, in configuration order.
    pub fn tables(&self) -> impl Iterator<Item = &TableRules> {
        self.tables.iter()
    }

    /// Number of configured tables.
    pub fn len(&self) -> usize {
        self.tables.len()
    }

    /// Whether no table is configured.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }
}

/// Cheap pre-check: the literal prefixes (or suffixes) before the first (after the last)
/// placeholder differ where both are literal, so no key can match both.
fn obviously_disjoint(a: &[template::Token], b: &[template::Token]) -> bool {
    literals_differ(a.iter(), b.iter()) || literals_differ(a.iter().rev(), b.iter().rev())
}

fn literals_differ<'a>(
    x: impl Iterator<Item = &'a template::Token>,
    y: impl Iterator<Item = &'a template::Token>,
) -> bool {
    use template::Token::Literal;
    for pair in x.zip(y) {
        match pair {
            (Literal(p), Literal(q)) if p == q => {}
            (Literal(_), Literal(_)) => return true,
            _ => return false,
        }
    }
    false
}

/// The compiled rule of one table: its templates and what they need.
#[derive(Debug, Clone)]
pub struct TableRules {
    rule: usize,
    schema: String,
    name: String,
    qualified: String,
    /// `ALTER TABLE` target with SQL quoting where needed.
    sql_name: String,
    templates: Vec<Template>,
    /// Per template: an earlier template of this table has the same shape, so its key may
    /// duplicate one already produced in the same call.
    may_repeat: Vec<bool>,
    patterns: Vec<String>,
}

impl TableRules {
    fn compile(rule: usize, config: &RuleConfig) -> Result<TableRules, RuleError> {
        let (schema, name) =
            identity::parse_table(&config.table).map_err(|reason| RuleError::InvalidTable {
                rule,
                table: config.table.clone(),
                reason,
            })?;
        let qualified = format!("{schema}.{name}");
        if config.keys.is_empty() {
            return Err(RuleError::NoKeys {
                rule,
                table: qualified,
            });
        }
        let mut templates: Vec<Template> = Vec::with_capacity(config.keys.len());
        let mut may_repeat = Vec::with_capacity(config.keys.len());
        let mut patterns: Vec<String> = Vec::new();
        for source in &config.keys {
            let template = Template::parse(source).map_err(|error| RuleError::Template {
                rule,
                table: qualified.clone(),
                template: source.clone(),
                error,
            })?;
            let same_shape = templates.iter().filter(|t| t.same_shape(&template));
            if same_shape
                .clone()
                .any(|t| t.columns().eq(template.columns()))
            {
                return Err(RuleError::DuplicateTemplate {
                    rule,
                    table: qualified,
                    template: source.clone(),
                });
            }
            may_repeat.push(same_shape.count() > 0);
            let pattern = template.scan_pattern();
            if !patterns.contains(&pattern) {
                patterns.push(pattern);
            }
            templates.push(template);
        }
        Ok(TableRules {
            rule,
            sql_name: format!(
                "{}.{}",
                identity::quote_ident(&schema),
                identity::quote_ident(&name)
            ),
            schema,
            name,
            qualified,
            templates,
            may_repeat,
            patterns,
        })
    }

    /// Index of this table's rule in the configuration slice.
    pub fn rule_index(&self) -> usize {
        self.rule
    }

    /// Schema name (`public` for a bare table name).
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Table name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `schema.table`, unquoted (`public.product`): the form of `Invalidation::table`.
    pub fn qualified(&self) -> &str {
        &self.qualified
    }

    /// The key templates, in configuration order.
    pub fn templates(&self) -> &[Template] {
        &self.templates
    }

    /// Every column any template references: what the row images must carry.
    pub fn columns(&self) -> BTreeSet<&str> {
        self.templates.iter().flat_map(Template::columns).collect()
    }

    /// Startup check of the rule against the live table.
    ///
    /// `identity` is the table's REPLICA IDENTITY and `table_columns` all its column names.
    ///
    /// # Errors
    /// [`RuleError::UnknownColumn`] if a template references a column the table does not have;
    /// [`RuleError::ColumnNotInOldImage`] if it references a column the old row image will not
    /// carry under `identity` (DEFAULT/INDEX: only the key/index columns; NOTHING: none; FULL:
    /// all). Without it an UPDATE that moves a row (say, to another category) or a DELETE could
    /// not evict the old row's key. The message names the table, template, column and the fix,
    /// `ALTER TABLE public.product REPLICA IDENTITY FULL;`.
    pub fn check_replica_identity(
        &self,
        identity: &ReplicaIdentity,
        table_columns: &[String],
    ) -> Result<(), RuleError> {
        for template in &self.templates {
            for column in template.columns() {
                if !table_columns.iter().any(|c| c == column) {
                    return Err(RuleError::UnknownColumn {
                        table: self.qualified.clone(),
                        template: template.source().to_owned(),
                        column: column.to_owned(),
                        available: table_columns.to_vec(),
                    });
                }
                if !identity.old_image_carries(column) {
                    return Err(RuleError::ColumnNotInOldImage {
                        table: self.qualified.clone(),
                        template: template.source().to_owned(),
                        column: column.to_owned(),
                        identity: identity.to_string(),
                        fix: format!("ALTER TABLE {} REPLICA IDENTITY FULL;", self.sql_name),
                    });
                }
            }
        }
        Ok(())
    }

    /// Appends the keys of one row image to `out`.
    ///
    /// Keys are deduplicated within one call (two templates of the same shape can give the same
    /// key); across calls, e.g. the old and new image of an UPDATE that changed nothing a key
    /// uses, the caller deduplicates (sort + dedup, or a set over the transaction).
    ///
    /// A NULL in a template's column means that template yields no key: a product with a NULL
    /// category has no `category:{category_id}:products` key to evict. For an UPDATE call this
    /// on the old image (when pgoutput sent one) and on the new one. Without an old image under
    /// REPLICA IDENTITY DEFAULT/INDEX the key did not change, and
    /// [`TableRules::check_replica_identity`] guarantees that templates use only key columns, so
    /// the new image's keys are the old ones.
    ///
    /// One allocation per produced key, sized exactly; nothing else is allocated.
    ///
    /// # Errors
    /// [`KeyBuildError`] naming the table, template and column when a needed column is
    /// [`Column::UnchangedToast`] or [`Column::Absent`] (unless another column of that template is
    /// NULL). `out` is then left as it was; the caller must invalidate every key of the table
    /// ([`TableRules::scan_patterns`]), never read the column as NULL. (A source holding the old
    /// FULL image may instead substitute the old value for an unchanged TOASTed one.)
    pub fn keys_for(&self, row: &dyn RowImage, out: &mut Vec<String>) -> Result<(), KeyBuildError> {
        let start = out.len();
        for (template, &may_repeat) in self.templates.iter().zip(&self.may_repeat) {
            match template.build(row) {
                Ok(Some(key)) => {
                    let repeated = may_repeat
                        && out
                            .get(start..)
                            .is_some_and(|produced| produced.contains(&key));
                    if !repeated {
                        out.push(key);
                    }
                }
                Ok(None) => {}
                Err((placeholder, missing)) => {
                    out.truncate(start);
                    let table = self.qualified.clone();
                    let template_src = template.source().to_owned();
                    let column = template.column_at(placeholder).to_owned();
                    return Err(match missing {
                        Missing::UnchangedToast => KeyBuildError::UnchangedToast {
                            table,
                            template: template_src,
                            column,
                        },
                        Missing::Absent => KeyBuildError::Absent {
                            table,
                            template: template_src,
                            column,
                        },
                    });
                }
            }
        }
        Ok(())
    }

    /// Redis `SCAN MATCH` patterns covering every Redis key any template of this table can
    /// produce, in the protocol's layout `{K}`, `{K}:lease`, `{K}:fence`: template `product:{id}`
    /// gives `{product:*}*`. Literal text is glob-escaped (`*?[]\` get a backslash); one pattern
    /// per template shape, in template order.
    ///
    /// Used for TRUNCATE and as the fallback when a row's keys are unknown. A pattern can match
    /// more keys than the template produces (`*` also matches `:`), which only evicts more.
    pub fn scan_patterns(&self) -> Vec<String> {
        self.patterns.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(table: &str, keys: &[&str]) -> RuleConfig {
        RuleConfig {
            table: table.into(),
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        }
    }

    fn product_rules() -> Rules {
        Rules::compile(&[cfg(
            "public.product",
            &["product:{id}", "category:{category_id}:products"],
        )])
        .unwrap()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn is_send_and_sync() {
        fn assert<T: Send + Sync>() {}
        assert::<Rules>();
        assert::<TableRules>();
    }

    #[test]
    fn update_moving_a_row_evicts_old_and_new_keys() {
        let rules = product_rules();
        let t = rules.table("public", "product").unwrap();
        assert_eq!(t.qualified(), "public.product");
        assert_eq!((t.schema(), t.name()), ("public", "product"));
        let old = MapRow::new()
            .text("id", "42")
            .text("category_id", "3")
            .text("price", "9.99");
        let new = MapRow::new()
            .text("id", "42")
            .text("category_id", "7")
            .text("price", "19.99");
        let mut keys = Vec::new();
        t.keys_for(&old, &mut keys).unwrap();
        t.keys_for(&new, &mut keys).unwrap();
        assert_eq!(
            keys,
            [
                "product:42",
                "category:3:products",
                "product:42",
                "category:7:products"
            ]
        );
        assert_eq!(rules.table("public", "orders").map(|_| ()), None);
        assert_eq!(rules.table("shop", "product").map(|_| ()), None);
    }

    #[test]
    fn null_column_yields_no_key_for_that_template() {
        let rules = product_rules();
        let t = rules.table("public", "product").unwrap();
        let mut keys = Vec::new();
        t.keys_for(&[("id", Some("5")), ("category_id", None)], &mut keys)
            .unwrap();
        assert_eq!(keys, ["product:5"]);
        // NULL wins over a missing value in the same template: the key does not exist.
        let rules = Rules::compile(&[cfg("t", &["x:{a}:{b}"])]).unwrap();
        let mut keys = Vec::new();
        rules
            .table("public", "t")
            .unwrap()
            .keys_for(&MapRow::new().null("a").unchanged_toast("b"), &mut keys)
            .unwrap();
        assert!(keys.is_empty());
    }

    #[test]
    fn unchanged_toast_and_absent_are_errors_not_nulls() {
        let rules = product_rules();
        let t = rules.table("public", "product").unwrap();
        let mut keys = vec!["earlier".to_owned()];
        let row = MapRow::new().text("id", "5").unchanged_toast("category_id");
        let err = t.keys_for(&row, &mut keys).unwrap_err();
        assert_eq!(
            err,
            KeyBuildError::UnchangedToast {
                table: "public.product".into(),
                template: "category:{category_id}:products".into(),
                column: "category_id".into(),
            }
        );
        assert_eq!(keys, ["earlier"], "partial keys are rolled back");
        let msg = err.to_string();
        assert!(
            msg.contains("public.product") && msg.contains("category_id"),
            "{msg}"
        );

        let err = t.keys_for(&[("id", Some("5"))], &mut keys).unwrap_err();
        assert!(matches!(err, KeyBuildError::Absent { .. }));
        assert_eq!(
            (err.table(), err.column()),
            ("public.product", "category_id")
        );
        assert_eq!(keys, ["earlier"]);
    }

    #[test]
    fn same_shape_templates_are_deduplicated_within_a_call() {
        let rules = Rules::compile(&[cfg(
            "product_price",
            &["product:{product_id}", "product:{bundle_id}", "price:{id}"],
        )])
        .unwrap();
        let t = rules.table("public", "product_price").unwrap();
        let mut keys = Vec::new();
        let row = [
            ("id", Some("1")),
            ("product_id", Some("9")),
            ("bundle_id", Some("9")),
        ];
        t.keys_for(&row, &mut keys).unwrap();
        assert_eq!(keys, ["product:9", "price:1"]);
        assert_eq!(t.scan_patterns(), ["{product:*}*", "{price:*}*"]);
        assert_eq!(
            t.columns().into_iter().collect::<Vec<_>>(),
            ["bundle_id", "id", "product_id"]
        );
    }

    #[test]
    fn replica_identity_default_without_the_column_is_an_error() {
        let rules = product_rules();
        let t = rules.table("public", "product").unwrap();
        let columns = strings(&["id", "name", "price", "category_id"]);
        let default = ReplicaIdentity::Default {
            key_columns: strings(&["id"]),
        };
        let err = t.check_replica_identity(&default, &columns).unwrap_err();
        let msg = err.to_string();
        for part in [
            "public.product",
            "category:{category_id}:products",
            "`category_id`",
            "REPLICA IDENTITY FULL",
            "ALTER TABLE public.product REPLICA IDENTITY FULL;",
        ] {
            assert!(msg.contains(part), "{part:?} missing from: {msg}");
        }
        assert!(
            matches!(err, RuleError::ColumnNotInOldImage { ref column, .. } if column == "category_id")
        );

        t.check_replica_identity(&ReplicaIdentity::Full, &columns)
            .unwrap();
        let both = ReplicaIdentity::Index {
            key_columns: strings(&["id", "category_id"]),
        };
        t.check_replica_identity(&both, &columns).unwrap();

        let err = t
            .check_replica_identity(&ReplicaIdentity::Nothing, &columns)
            .unwrap_err();
        assert!(matches!(err, RuleError::ColumnNotInOldImage { ref column, .. } if column == "id"));
        assert!(err.to_string().contains("NOTHING"));

        let no_pk = ReplicaIdentity::Default {
            key_columns: vec![],
        };
        let msg = t
            .check_replica_identity(&no_pk, &columns)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no primary key"), "{msg}");
    }

    #[test]
    fn replica_identity_check_reports_unknown_columns() {
        let rules = product_rules();
        let t = rules.table("public", "product").unwrap();
        let columns = strings(&["id", "name", "categoryid"]);
        let err = t
            .check_replica_identity(&ReplicaIdentity::Full, &columns)
            .unwrap_err();
        assert!(
            matches!(err, RuleError::UnknownColumn { ref column, .. } if column == "category_id")
        );
        let msg = err.to_string();
        assert!(
            msg.contains("public.product")
                && msg.contains("category:{category_id}:products")
                && msg.contains("id, name, categoryid"),
            "{msg}"
        );
    }

    #[test]
    fn fix_quotes_awkward_table_names() {
        let rules = Rules::compile(&[cfg("\"Shop\".order", &["order:{id}:{status}"])]).unwrap();
        let t = rules.table("Shop", "order").unwrap();
        assert_eq!(t.qualified(), "Shop.order");
        let err = t
            .check_replica_identity(
                &ReplicaIdentity::Default {
                    key_columns: strings(&["id"]),
                },
                &strings(&["id", "status"]),
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("ALTER TABLE \"Shop\".\"order\" REPLICA IDENTITY FULL;"),
            "{err}"
        );
    }

    #[test]
    fn config_errors_name_rule_table_template_and_position() {
        let err = |configs: &[RuleConfig]| Rules::compile(configs).unwrap_err();

        let e = err(&[
            cfg("product", &["product:{id}"]),
            cfg("orders", &["o:{a}{b}"]),
        ]);
        assert_eq!(
            e,
            RuleError::Template {
                rule: 1,
                table: "public.orders".into(),
                template: "o:{a}{b}".into(),
                error: TemplateError {
                    column: 6,
                    problem: TemplateProblem::MissingSeparator {
                        separator: String::new()
                    },
                },
            }
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "rules[1] (table public.orders): key template `o:{a}{b}` at column 6: "
            ),
            "{msg}"
        );

        let e = err(&[cfg("product", &["p:{a:b}"])]);
        assert!(e.to_string().contains("at column 5: unexpected `:`"), "{e}");
        let e = err(&[cfg("product", &["p:{}"])]);
        assert!(e.to_string().contains("empty placeholder"), "{e}");
        let e = err(&[cfg("product", &["p:}{id}"])]);
        assert!(
            e.to_string().contains("at column 3: `}` in literal text"),
            "{e}"
        );

        let e = err(&[cfg("a", &["a:{id}"]), cfg("public.a", &["b:{id}"])]);
        assert_eq!(
            e,
            RuleError::DuplicateTable {
                rule: 1,
                first_rule: 0,
                table: "public.a".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "rules[1]: table public.a already has a rule (rules[0]); list all of its key templates in one rule"
        );
        assert_eq!(
            err(&[cfg("shop.a", &[])]),
            RuleError::NoKeys {
                rule: 0,
                table: "shop.a".into()
            }
        );
        assert!(matches!(
            err(&[cfg("a", &["a:{id}", "a:{\"id\"}"])]),
            RuleError::DuplicateTemplate { rule: 0, .. }
        ));
        let e = err(&[cfg("Product", &["p:{id}"])]);
        assert!(matches!(e, RuleError::InvalidTable { rule: 0, .. }));
        assert!(e.to_string().contains("`product`"), "{e}");
        assert!(matches!(
            err(&[cfg("a.b.c", &["p:{id}"])]),
            RuleError::InvalidTable { .. }
        ));
    }

    #[test]
    fn overlapping_templates_are_rejected_with_an_example() {
        let e = Rules::compile(&[
            cfg("a", &["p:{id}"]),
            cfg("b", &["item-{id}", "x:{id}"]),
            cfg("c", &["item-{id}-detail"]),
        ])
        .unwrap_err();
        assert_eq!(
            e,
            RuleError::OverlappingTemplates {
                first: Box::new(TemplateRef {
                    rule: 1,
                    table: "public.b".into(),
                    template: "item-{id}".into(),
                }),
                second: Box::new(TemplateRef {
                    rule: 2,
                    table: "public.c".into(),
                    template: "item-{id}-detail".into(),
                }),
                example: "item--detail".into(),
            }
        );
        assert_eq!(
            e.to_string(),
            "key templates `item-{id}` (rules[1], table public.b) and `item-{id}-detail` \
             (rules[2], table public.c) can both produce the key `item--detail`: a column value \
             could stand in for the literal text of the other template and forge its keys. Make \
             their literal texts differ at a character outside `A-Z a-z 0-9 - . _ ~` (end each \
             literal prefix with `:`, for instance), or give keys of the same kind the same shape"
        );
        // Same shape on two tables is the point (both evict `product:42`), and separators keep
        // related kinds apart.
        Rules::compile(&[
            cfg(
                "product",
                &["product:{id}", "product:{id}:reviews", "products:all"],
            ),
            cfg("product_price", &["product:{product_id}"]),
            cfg("review", &["product:{product_id}:reviews", "review:{id}"]),
        ])
        .unwrap();
    }

    #[test]
    fn config_deserializes_and_rejects_unknown_fields() {
        let ok: Vec<RuleConfig> =
            serde_json::from_str(r#"[{"table":"product","keys":["product:{id}"]}]"#).unwrap();
        assert_eq!(ok, [cfg("product", &["product:{id}"])]);
        assert!(
            serde_json::from_str::<RuleConfig>(r#"{"table":"p","keys":[],"key":"x"}"#).is_err()
        );
    }

    #[test]
    fn empty_rule_set_compiles() {
        let rules = Rules::compile(&[]).unwrap();
        assert!(rules.is_empty() && rules.tables().next().is_none());
        assert_eq!(rules.len(), 0);
    }
}
