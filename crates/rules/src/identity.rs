//! REPLICA IDENTITY and SQL identifiers.

use std::fmt;

/// A table's REPLICA IDENTITY: which columns the *old* row image of an UPDATE or DELETE carries
/// in the WAL (and so in pgoutput).
///
/// - `Default` (the primary key) and `Index` (`USING INDEX`): only those key columns. pgoutput
///   sends an old key image (`K`) only when the key changed, and a DELETE's old image is the key.
/// - `Full`: every column (old image `O`).
/// - `Nothing`: no old image at all.
///
/// An UPDATE must evict the keys of the old row as well as the new one (a category change moves
/// the product to another listing), so every column a template uses must be in the old image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `REPLICA IDENTITY DEFAULT`: the primary-key columns (empty if the table has no primary key).
    Default {
        /// The primary-key columns.
        key_columns: Vec<String>,
    },
    /// `REPLICA IDENTITY USING INDEX`: the columns of that unique index.
    Index {
        /// The index columns.
        key_columns: Vec<String>,
    },
    /// `REPLICA IDENTITY FULL`: all columns.
    Full,
    /// `REPLICA IDENTITY NOTHING`: no old image.
    Nothing,
}

impl ReplicaIdentity {
    /// From `pg_class.relreplident` or the replica-identity byte of a pgoutput Relation message
    /// (`d`, `i`, `f`, `n`), with the key columns (pgoutput: the columns flagged as part of the
    /// key). `None` for an unknown code.
    pub fn from_pg_code(code: u8, key_columns: Vec<String>) -> Option<ReplicaIdentity> {
        match code {
            b'd' => Some(ReplicaIdentity::Default { key_columns }),
            b'i' => Some(ReplicaIdentity::Index { key_columns }),
            b'f' => Some(ReplicaIdentity::Full),
            b'n' => Some(ReplicaIdentity::Nothing),
            _ => None,
        }
    }

    /// Whether the old row image carries `column` under this identity.
    pub fn old_image_carries(&self, column: &str) -> bool {
        match self {
            ReplicaIdentity::Default { key_columns } | ReplicaIdentity::Index { key_columns } => {
                key_columns.iter().any(|c| c == column)
            }
            ReplicaIdentity::Full => true,
            ReplicaIdentity::Nothing => false,
        }
    }
}

/// `DEFAULT (primary key: id)`, `USING INDEX (index columns: a, b)`, `FULL`, `NOTHING`.
impl fmt::Display for ReplicaIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaIdentity::Default { key_columns } if key_columns.is_empty() => {
                f.write_str("DEFAULT (the table has no primary key, so no columns)")
            }
            ReplicaIdentity::Default { key_columns } => {
                write!(f, "DEFAULT (primary key: {})", key_columns.join(", "))
            }
            ReplicaIdentity::Index { key_columns } => {
                write!(f, "USING INDEX (index columns: {})", key_columns.join(", "))
            }
            ReplicaIdentity::Full => f.write_str("FULL"),
            ReplicaIdentity::Nothing => f.write_str("NOTHING"),
        }
    }
}

/// Splits a configured table name into `(schema, table)`: `schema.table`, or `table` in schema
/// `public`. Each part is an unquoted identifier `[a-z_][a-z0-9_$]*` or a double-quoted one
/// (`"Order Items"`, `""` for a quote), as in SQL; upper case in an unquoted part is rejected
/// (PostgreSQL would fold it) with a hint.
pub(crate) fn parse_table(text: &str) -> Result<(String, String), String> {
    let mut parts = Vec::new();
    let mut rest = text;
    loop {
        let (part, after) = parse_ident(rest)?;
        parts.push(part);
        match after.strip_prefix('.') {
            Some(more) => rest = more,
            None if after.is_empty() => break,
            None => {
                return Err(format!(
                    "unexpected `{after}`: expected `schema.table` or `table` (quote names with \
                     other characters: `\"My Table\"`)"
                ));
            }
        }
    }
    let mut parts = parts.into_iter();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(table), None, None) => Ok(("public".to_owned(), table)),
        (Some(schema), Some(table), None) => Ok((schema, table)),
        _ => Err("expected `schema.table` or `table`, not more parts".to_owned()),
    }
}

fn parse_ident(text: &str) -> Result<(String, &str), String> {
    if let Some(quoted) = text.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = quoted.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if matches!(chars.peek(), Some((_, '"'))) {
                    chars.next();
                    name.push('"');
                } else {
                    if name.is_empty() {
                        return Err("empty quoted name `\"\"`".to_owned());
                    }
                    return Ok((name, quoted.get(i + 1..).unwrap_or("")));
                }
            } else {
                name.push(c);
            }
        }
        return Err("quoted name is missing its closing `\"`".to_owned());
    }
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
        .unwrap_or(text.len());
    let (name, rest) = text.split_at(end);
    match name.chars().next() {
        None => Err("empty name".to_owned()),
        Some(c) if c.is_ascii_digit() || c == '$' => {
            Err(format!("`{name}` must start with a letter or `_`"))
        }
        Some(_) if name.bytes().any(|b| b.is_ascii_uppercase()) => Err(format!(
            "unquoted name `{name}` has upper-case letters: PostgreSQL folds unquoted names to \
             lower case, so write `{}` for a table created without quotes, or `\"{name}\"` for a \
             case-sensitive name",
            name.to_ascii_lowercase()
        )),
        Some(_) => Ok((name.to_owned(), rest)),
    }
}

/// `name` as a SQL identifier: as is when PostgreSQL would read it back unchanged unquoted,
/// otherwise double-quoted (`product` → `product`, `OrderItem` → `"OrderItem"`), as
/// PostgreSQL's own `quote_ident()` does. Used in every fix cacheclear prints.
pub fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$')
        && !RESERVED.contains(&name);
    if plain {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// PostgreSQL's reserved and type/function-name keywords: not usable as unquoted table names.
const RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_table_names() {
        let ok = |s: &str| parse_table(s).unwrap();
        assert_eq!(ok("product"), ("public".into(), "product".into()));
        assert_eq!(ok("shop.product"), ("shop".into(), "product".into()));
        assert_eq!(
            ok("\"My Shop\".\"a.b\"\"c\""),
            ("My Shop".into(), "a.b\"c".into())
        );
        assert_eq!(ok("_x$1.t_2"), ("_x$1".into(), "t_2".into()));
        for bad in [
            "", ".", "a.", ".a", "a.b.c", "Product", "a b", "1a", "\"\"", "\"a", "a-b",
        ] {
            assert!(parse_table(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_table("Product").unwrap_err().contains("`product`"));
    }

    #[test]
    fn quotes_identifiers_only_when_needed() {
        assert_eq!(quote_ident("product"), "product");
        assert_eq!(quote_ident("order"), "\"order\"");
        assert_eq!(quote_ident("Order Items"), "\"Order Items\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("1x"), "\"1x\"");
    }

    #[test]
    fn identity_codes_and_display() {
        let d = ReplicaIdentity::from_pg_code(b'd', vec!["id".into()]).unwrap();
        assert!(d.old_image_carries("id") && !d.old_image_carries("category_id"));
        assert_eq!(d.to_string(), "DEFAULT (primary key: id)");
        assert_eq!(
            ReplicaIdentity::from_pg_code(b'f', vec![]),
            Some(ReplicaIdentity::Full)
        );
        assert_eq!(
            ReplicaIdentity::from_pg_code(b'n', vec![]),
            Some(ReplicaIdentity::Nothing)
        );
        assert_eq!(ReplicaIdentity::from_pg_code(b'x', vec![]), None);
        assert!(!ReplicaIdentity::Nothing.old_image_carries("id"));
    }
}
