//! Key templates: parsing, key building, reading keys back, scan patterns.

use std::fmt;

use crate::escape::{decode_value, encode_value, encoded_len, glob_escape, is_encoded_alphabet};
use crate::row::{Column, RowImage};

/// A parsed key template such as `category:{category_id}:products`: literal text and `{column}`
/// placeholders, pre-split so building a key is a few copies and one allocation.
///
/// # Syntax
/// - `{name}` is a placeholder for column `name`, where `name` matches `[a-z_][a-z0-9_$]*`
///   (PostgreSQL's unquoted identifiers, which it folds to lower case). Upper case is rejected
///   rather than silently folded: write `{categoryid}` for a column created without quotes, or the
///   quoted form `{"categoryId"}` for a case-sensitive name. Inside quotes any characters are
///   allowed and `""` stands for one `"`.
/// - Everything else is literal text. It may not contain `{` or `}` (they would break the Redis
///   Cluster hash tag of the key layout `{K}`), `%` (the escape character of values) or control
///   characters. There is no escape for braces and no nesting, formats or defaults.
/// - Two placeholders must be separated by literal text containing at least one character
///   outside the encoded-value alphabet `A-Z a-z 0-9 - . _ ~ %`, e.g. `:`. Otherwise `{a}-{b}`
///   would give `x-y-z` for both `("x-y", "z")` and `("x", "y-z")`.
/// - A template needs some literal text (`{id}` alone is rejected): keys are never empty and each
///   kind of key has its own namespace.
///
/// Values are escaped with [`crate::encode_value`], so with these rules the mapping from value
/// tuples to keys is injective and [`Template::decode_key`] can read a key back.
///
/// `Display` gives back the source text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Template {
    source: String,
    /// Literal text before the first placeholder (the whole key if there is none).
    prefix: String,
    parts: Vec<Part>,
    /// Bytes of literal text in total.
    literal_len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Part {
    /// Column name (unquoted).
    column: String,
    /// Literal text after this placeholder, up to the next placeholder or the end.
    suffix: String,
    /// Byte index in `suffix` of its first character outside the encoded alphabet (only
    /// meaningful when another placeholder follows; the parser guarantees one exists then).
    separator_at: usize,
}

/// One piece of a [`Template`], in order (see [`Template::segments`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment<'a> {
    /// Literal text, copied into the key as is (never empty).
    Literal(&'a str),
    /// A placeholder: the column whose escaped value goes here.
    Placeholder(&'a str),
}

/// Why a key template does not parse, and where (see [`Template`] for the syntax).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at column {column}: {problem}")]
pub struct TemplateError {
    /// 1-based character position in the template of the offending character.
    pub column: usize,
    /// What is wrong.
    pub problem: TemplateProblem,
}

/// The syntax problems a key template can have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateProblem {
    /// The template is the empty string.
    #[error("the template is empty")]
    Empty,
    /// `{` without a matching `}`.
    #[error("`{{` opens a placeholder that is never closed with `}}`")]
    UnclosedPlaceholder,
    /// `{}` or `{""}`.
    #[error("empty placeholder: write a column name, e.g. `{{id}}`")]
    EmptyPlaceholder,
    /// `{` inside a placeholder.
    #[error("`{{` inside a placeholder: placeholders cannot nest")]
    NestedPlaceholder,
    /// A character that cannot appear in an unquoted column name (formats, spaces, `:` ...).
    #[error(
        "unexpected `{found}` in a placeholder: a placeholder is a column name `{{column}}` \
         ([a-z_][a-z0-9_$]*) or a quoted name `{{\"Column Name\"}}`; no spaces, formats, \
         defaults or expressions"
    )]
    UnexpectedChar {
        /// The character found.
        found: char,
    },
    /// An unquoted column name with upper-case letters.
    #[error(
        "unquoted column name `{name}` has upper-case letters: PostgreSQL folds unquoted names to \
         lower case, so write `{{{}}}` for a column created without quotes, or `{{\"{name}\"}}` \
         for a case-sensitive name",
        .name.to_ascii_lowercase()
    )]
    UppercaseName {
        /// The name as written.
        name: String,
    },
    /// `{"...` without the closing quote.
    #[error("quoted column name is missing its closing `\"`")]
    UnterminatedQuote,
    /// `}` outside a placeholder.
    #[error(
        "`}}` in literal text: braces are reserved for placeholders, and in a key they would \
         break the Redis Cluster hash tag of the layout `{{K}}`"
    )]
    BraceInLiteral,
    /// `%` in literal text.
    #[error(
        "`%` in literal text: `%` is the escape character of encoded values, so a literal `%` \
         would make keys ambiguous"
    )]
    PercentInLiteral,
    /// A control character in literal text.
    #[error("control character U+{:04X} in literal text", u32::from(*.found))]
    ControlInLiteral {
        /// The character found.
        found: char,
    },
    /// Two placeholders whose separating text has no character outside the encoded alphabet.
    #[error(
        "placeholders must be separated by literal text containing a character outside \
         `A-Z a-z 0-9 - . _ ~ %` (such as `:` or `/`), {}: otherwise two different value \
         tuples could produce the same key",
        describe_separator(.separator)
    )]
    MissingSeparator {
        /// The literal text between the two placeholders (possibly empty).
        separator: String,
    },
    /// The template is a single placeholder with no literal text.
    #[error(
        "the template is a bare placeholder: add literal text such as `product:` so that keys \
         are never empty and each kind of key has its own namespace"
    )]
    NoLiteralText,
}

fn describe_separator(separator: &str) -> String {
    if separator.is_empty() {
        "but these two are adjacent".to_owned()
    } else {
        format!("but the separator here is `{separator}`")
    }
}

/// A needed column had no usable value in a row image (crate-internal; the caller adds context).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missing {
    UnchangedToast,
    Absent,
}

impl Template {
    /// Parses `source` (syntax in the type's docs).
    ///
    /// # Errors
    /// [`TemplateError`] with the 1-based column of the first problem.
    ///
    /// ```
    /// use cacheclear_rules::{Template, TemplateProblem};
    /// let t = Template::parse("category:{category_id}:products").unwrap();
    /// assert_eq!(t.columns().collect::<Vec<_>>(), ["category_id"]);
    /// assert_eq!(t.to_string(), "category:{category_id}:products");
    /// let err = Template::parse("p:{a}-{b}").unwrap_err();
    /// assert_eq!(err.column, 7);
    /// assert!(matches!(err.problem, TemplateProblem::MissingSeparator { .. }));
    /// ```
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let err = |column: usize, problem: TemplateProblem| TemplateError { column, problem };
        if source.is_empty() {
            return Err(err(1, TemplateProblem::Empty));
        }
        let mut prefix: Option<String> = None;
        let mut parts: Vec<Part> = Vec::new();
        let mut literal = String::new();
        let mut chars = source.chars().zip(1usize..).peekable();
        while let Some((c, col)) = chars.next() {
            match c {
                '{' => {
                    let column = parse_placeholder(&mut chars, col)?;
                    let text = std::mem::take(&mut literal);
                    match parts.last_mut() {
                        None => prefix = Some(text),
                        Some(previous) => {
                            let Some(at) = text.find(|c: char| !is_encoded_alphabet(c)) else {
                                return Err(err(
                                    col,
                                    TemplateProblem::MissingSeparator { separator: text },
                                ));
                            };
                            previous.suffix = text;
                            previous.separator_at = at;
                        }
                    }
                    parts.push(Part {
                        column,
                        suffix: String::new(),
                        separator_at: 0,
                    });
                }
                '}' => return Err(err(col, TemplateProblem::BraceInLiteral)),
                '%' => return Err(err(col, TemplateProblem::PercentInLiteral)),
                c if c.is_control() => {
                    return Err(err(col, TemplateProblem::ControlInLiteral { found: c }));
                }
                c => literal.push(c),
            }
        }
        match parts.last_mut() {
            None => prefix = Some(literal),
            Some(last) => last.suffix = literal,
        }
        let prefix = prefix.unwrap_or_default();
        let literal_len = prefix.len() + parts.iter().map(|p| p.suffix.len()).sum::<usize>();
        if literal_len == 0 {
            return Err(err(1, TemplateProblem::NoLiteralText));
        }
        Ok(Template {
            source: source.to_owned(),
            prefix,
            parts,
            literal_len,
        })
    }

    /// The source text, as written in the configuration.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The placeholder columns in order of appearance (a column used twice appears twice).
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().map(|p| p.column.as_str())
    }

    /// The literal and placeholder pieces in order; empty literal pieces are left out.
    pub fn segments(&self) -> impl Iterator<Item = Segment<'_>> {
        let prefix = (!self.prefix.is_empty()).then_some(Segment::Literal(self.prefix.as_str()));
        prefix.into_iter().chain(self.parts.iter().flat_map(|p| {
            let suffix = (!p.suffix.is_empty()).then_some(Segment::Literal(p.suffix.as_str()));
            std::iter::once(Segment::Placeholder(p.column.as_str())).chain(suffix)
        }))
    }

    /// Whether the two templates have the same literal text in the same places, whatever their
    /// column names. Such templates produce the same key for the same values — on purpose, e.g.
    /// `product:{id}` on table `product` and `product:{product_id}` on table `product_price` both
    /// evict `product:42`. Templates of different shapes never produce a common key (checked by
    /// [`crate::Rules::compile`]).
    pub fn same_shape(&self, other: &Template) -> bool {
        self.prefix == other.prefix
            && self.parts.len() == other.parts.len()
            && self
                .parts
                .iter()
                .zip(&other.parts)
                .all(|(a, b)| a.suffix == b.suffix)
    }

    /// Builds the key for `values`, one per placeholder in [`Template::columns`] order, each in
    /// PostgreSQL's text form. This is how an application builds the key it reads, so that it is
    /// byte-for-byte the key the rules evict. Returns `None` if `values.len()` is not the number
    /// of placeholders.
    ///
    /// ```
    /// let t = cacheclear_rules::Template::parse("category:{category_id}:products").unwrap();
    /// assert_eq!(t.render(&["7"]).as_deref(), Some("category:7:products"));
    /// assert_eq!(t.render(&["a:b"]).as_deref(), Some("category:a%3Ab:products"));
    /// ```
    pub fn render(&self, values: &[&str]) -> Option<String> {
        if values.len() != self.parts.len() {
            return None;
        }
        let len = self.literal_len + values.iter().map(|v| encoded_len(v)).sum::<usize>();
        let mut key = String::with_capacity(len);
        key.push_str(&self.prefix);
        for (part, value) in self.parts.iter().zip(values) {
            encode_value(value, &mut key);
            key.push_str(&part.suffix);
        }
        Some(key)
    }

    /// Reads a key back: the decoded values, one per placeholder, if this template can produce
    /// `key` (i.e. `key == self.render(values)` for exactly the returned values), else `None`.
    ///
    /// ```
    /// let t = cacheclear_rules::Template::parse("o:{shop}:{id}").unwrap();
    /// assert_eq!(t.decode_key("o:a%3Ab:9"), Some(vec!["a:b".to_owned(), "9".to_owned()]));
    /// assert_eq!(t.decode_key("o:a:b:9"), None);
    /// ```
    pub fn decode_key(&self, key: &str) -> Option<Vec<String>> {
        let mut rest = key.strip_prefix(self.prefix.as_str())?;
        let mut values = Vec::with_capacity(self.parts.len());
        let last = self.parts.len().checked_sub(1);
        for (i, part) in self.parts.iter().enumerate() {
            if Some(i) == last {
                let encoded = rest.strip_suffix(part.suffix.as_str())?;
                values.push(decode_value(encoded)?);
                rest = "";
            } else {
                // The encoded value and `suffix[..separator_at]` use only the encoded alphabet, so
                // the first character outside it is `suffix[separator_at]`.
                let boundary = rest.find(|c: char| !is_encoded_alphabet(c))?;
                let end = boundary.checked_sub(part.separator_at)?;
                let encoded = rest.get(..end)?;
                rest = rest.get(end..)?.strip_prefix(part.suffix.as_str())?;
                values.push(decode_value(encoded)?);
            }
        }
        rest.is_empty().then_some(values)
    }

    /// The Redis glob that matches the layout keys `{K}`, `{K}:lease`, `{K}:fence` of every key
    /// `K` this template can produce: `{` + literal text glob-escaped with each placeholder as
    /// `*` + `}*`. For `product:{id}` it is `{product:*}*`.
    ///
    /// It can match more than this template's keys (a `*` also matches `:`), which is safe for
    /// its uses (TRUNCATE, fallback): they only evict.
    pub fn scan_pattern(&self) -> String {
        let mut pattern = String::with_capacity(self.literal_len + self.parts.len() + 3);
        pattern.push('{');
        glob_escape(&self.prefix, &mut pattern);
        for part in &self.parts {
            pattern.push('*');
            glob_escape(&part.suffix, &mut pattern);
        }
        pattern.push_str("}*");
        pattern
    }

    /// The key of `row`: `Ok(None)` if a placeholder column is NULL, `Err` with the index of the
    /// first placeholder whose value is missing. Exactly one allocation, sized to the key.
    pub(crate) fn build(&self, row: &dyn RowImage) -> Result<Option<String>, (usize, Missing)> {
        let mut len = self.literal_len;
        let mut missing = None;
        for (i, part) in self.parts.iter().enumerate() {
            match row.column(&part.column) {
                // A NULL wins over a missing value elsewhere: the key does not exist either way.
                Column::Null => return Ok(None),
                Column::Text(v) => len += encoded_len(v),
                Column::UnchangedToast => {
                    missing.get_or_insert((i, Missing::UnchangedToast));
                }
                Column::Absent => {
                    missing.get_or_insert((i, Missing::Absent));
                }
            }
        }
        if let Some(m) = missing {
            return Err(m);
        }
        let mut key = String::with_capacity(len);
        key.push_str(&self.prefix);
        for (i, part) in self.parts.iter().enumerate() {
            match row.column(&part.column) {
                Column::Text(v) => encode_value(v, &mut key),
                // Only reachable with a row image that answers differently the second time.
                Column::Null => return Ok(None),
                Column::UnchangedToast => return Err((i, Missing::UnchangedToast)),
                Column::Absent => return Err((i, Missing::Absent)),
            }
            key.push_str(&part.suffix);
        }
        Ok(Some(key))
    }

    /// Column of placeholder `i` (for error messages).
    pub(crate) fn column_at(&self, i: usize) -> &str {
        self.parts.get(i).map_or("", |p| p.column.as_str())
    }

    /// The template as a token sequence for the overlap check: literal chars and placeholders.
    pub(crate) fn tokens(&self) -> Vec<Token> {
        let mut tokens: Vec<Token> = self.prefix.chars().map(Token::Literal).collect();
        for part in &self.parts {
            tokens.push(Token::Value);
            tokens.extend(part.suffix.chars().map(Token::Literal));
        }
        tokens
    }
}

/// A template as a sequence for the overlap check: each literal char, and `Value` for any string
/// of unreserved characters (what an encoded value can be, up to `%XX` groups, which never matter
/// for overlaps because literal text has no `%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    Literal(char),
    Value,
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Parses the rest of a placeholder after its `{` (at column `open`), returning the column name.
fn parse_placeholder(
    chars: &mut std::iter::Peekable<impl Iterator<Item = (char, usize)>>,
    open: usize,
) -> Result<String, TemplateError> {
    let err = |column: usize, problem: TemplateProblem| TemplateError { column, problem };
    let mut name = String::new();
    match chars.peek().copied() {
        None => return Err(err(open, TemplateProblem::UnclosedPlaceholder)),
        Some(('}', _)) => return Err(err(open, TemplateProblem::EmptyPlaceholder)),
        Some(('"', _)) => {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(err(open, TemplateProblem::UnterminatedQuote)),
                    Some(('"', _)) => {
                        if matches!(chars.peek(), Some(('"', _))) {
                            chars.next();
                            name.push('"');
                        } else {
                            break;
                        }
                    }
                    Some((c, _)) => name.push(c),
                }
            }
            return match chars.next() {
                None => Err(err(open, TemplateProblem::UnclosedPlaceholder)),
                Some(('}', _)) if name.is_empty() => {
                    Err(err(open, TemplateProblem::EmptyPlaceholder))
                }
                Some(('}', _)) => Ok(name),
                Some(('{', col)) => Err(err(col, TemplateProblem::NestedPlaceholder)),
                Some((found, col)) => Err(err(col, TemplateProblem::UnexpectedChar { found })),
            };
        }
        Some(_) => {}
    }
    let mut uppercase_at = None;
    loop {
        match chars.next() {
            None => return Err(err(open, TemplateProblem::UnclosedPlaceholder)),
            Some(('}', _)) => break,
            Some(('{', col)) => return Err(err(col, TemplateProblem::NestedPlaceholder)),
            Some((c, col)) => {
                let first = name.is_empty();
                let ok = c.is_ascii_lowercase()
                    || c == '_'
                    || (!first && (c.is_ascii_digit() || c == '$'));
                if c.is_ascii_uppercase() {
                    uppercase_at.get_or_insert(col);
                } else if !ok {
                    return Err(err(col, TemplateProblem::UnexpectedChar { found: c }));
                }
                name.push(c);
            }
        }
    }
    match uppercase_at {
        Some(col) => Err(err(col, TemplateProblem::UppercaseName { name })),
        None => Ok(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(source: &str) -> (usize, TemplateProblem) {
        let e = Template::parse(source).unwrap_err();
        (e.column, e.problem)
    }

    #[test]
    fn parses_placeholders_and_literals() {
        let t = Template::parse("category:{category_id}:products").unwrap();
        assert_eq!(
            t.segments().collect::<Vec<_>>(),
            [
                Segment::Literal("category:"),
                Segment::Placeholder("category_id"),
                Segment::Literal(":products"),
            ]
        );
        let t = Template::parse(r#"u:{"userId"}/{"a""b}"}"#).unwrap();
        assert_eq!(t.columns().collect::<Vec<_>>(), ["userId", "a\"b}"]);
        assert_eq!(t.render(&["1", "2"]).as_deref(), Some("u:1/2"));
        let t = Template::parse("products:all").unwrap();
        assert_eq!(t.columns().count(), 0);
        assert_eq!(t.render(&[]).as_deref(), Some("products:all"));
        assert_eq!(t.decode_key("products:all"), Some(vec![]));
        assert_eq!(t.decode_key("products:al"), None);
        let t = Template::parse("{id}:p").unwrap();
        assert_eq!(t.render(&["x"]).as_deref(), Some("x:p"));
        assert_eq!(t.scan_pattern(), "{*:p}*");
    }

    #[test]
    fn reports_syntax_errors_with_columns() {
        assert_eq!(problem(""), (1, TemplateProblem::Empty));
        assert_eq!(problem("p:{id"), (3, TemplateProblem::UnclosedPlaceholder));
        assert_eq!(problem("p:{}"), (3, TemplateProblem::EmptyPlaceholder));
        assert_eq!(problem("p:{\"\"}"), (3, TemplateProblem::EmptyPlaceholder));
        assert_eq!(problem("p:{a{b}}"), (5, TemplateProblem::NestedPlaceholder));
        assert_eq!(
            problem("p:{id:x}"),
            (6, TemplateProblem::UnexpectedChar { found: ':' })
        );
        assert_eq!(
            problem("p:{ id}"),
            (4, TemplateProblem::UnexpectedChar { found: ' ' })
        );
        assert_eq!(
            problem("p:{1d}"),
            (4, TemplateProblem::UnexpectedChar { found: '1' })
        );
        assert_eq!(
            problem("p:{categoryId}"),
            (
                12,
                TemplateProblem::UppercaseName {
                    name: "categoryId".into()
                }
            )
        );
        assert_eq!(problem("p:{\"ab}"), (3, TemplateProblem::UnterminatedQuote));
        assert_eq!(problem("p:id}"), (5, TemplateProblem::BraceInLiteral));
        assert_eq!(problem("p%:{id}"), (2, TemplateProblem::PercentInLiteral));
        assert_eq!(
            problem("p\n{id}"),
            (2, TemplateProblem::ControlInLiteral { found: '\n' })
        );
        assert_eq!(
            problem("p:{a}{b}"),
            (
                6,
                TemplateProblem::MissingSeparator {
                    separator: String::new()
                }
            )
        );
        assert_eq!(
            problem("p:{a}-x_{b}"),
            (
                9,
                TemplateProblem::MissingSeparator {
                    separator: "-x_".into()
                }
            )
        );
        assert_eq!(problem("{id}"), (1, TemplateProblem::NoLiteralText));
        let msg = Template::parse("p:{categoryId}").unwrap_err().to_string();
        assert!(
            msg.contains("{categoryid}") && msg.contains("{\"categoryId\"}"),
            "{msg}"
        );
    }

    #[test]
    fn separator_may_carry_unreserved_chars_around_the_boundary() {
        let t = Template::parse("o:{a}x-:y{b}.z").unwrap();
        let key = t.render(&["p-x", "q:"]).unwrap();
        assert_eq!(key, "o:p-xx-:yq%3A.z");
        assert_eq!(t.decode_key(&key), Some(vec!["p-x".into(), "q:".into()]));
        assert_eq!(t.scan_pattern(), "{o:*x-:y*.z}*");
    }
}
