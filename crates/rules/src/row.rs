//! Row images: what [`crate::TableRules::keys_for`] reads column values from.

/// One column of a row image, as logical replication delivers it.
///
/// The distinction between [`Column::Null`] and the two "no value" cases matters: a NULL is a real
/// value (a product without a category has no `category:{category_id}:products` key), while
/// [`Column::UnchangedToast`] and [`Column::Absent`] mean the value exists but was not sent, so the
/// keys it would produce are unknown and must never be treated as "no key".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column<'a> {
    /// SQL NULL (pgoutput tuple data kind `n` for a column the image really carries).
    Null,
    /// The value in PostgreSQL's text output form (pgoutput kind `t`), e.g. `42`, `2024-01-31`,
    /// `t`. Keys are built from exactly this text, so the application must render the same text
    /// (see [`crate::Template::render`]).
    Text(&'a str),
    /// An unchanged TOASTed value (pgoutput kind `u`): the column has a value, but the new row
    /// image of an UPDATE does not repeat it.
    UnchangedToast,
    /// The image does not carry the column at all: the column is unknown to the relation, or this
    /// is an old *key* image (pgoutput `K` under REPLICA IDENTITY DEFAULT/INDEX) and the column is
    /// not part of the identity. pgoutput sends such non-key columns as kind `n`; a source must
    /// report them as `Absent`, never as [`Column::Null`].
    Absent,
}

/// A row image (new row of INSERT/UPDATE, old row of UPDATE/DELETE) whose columns can be looked up
/// by name.
///
/// Implemented by the CDC source over its decoded tuples; [`MapRow`], fixed-size arrays and
/// vectors of `(name, Option<value>)` pairs implement it for tests and simple callers.
pub trait RowImage {
    /// The column called `name` (exact, case-sensitive match), or [`Column::Absent`].
    fn column(&self, name: &str) -> Column<'_>;
}

/// Pairs `(column, value)`; `None` is SQL NULL, a missing name is [`Column::Absent`].
///
/// ```
/// use cacheclear_rules::{Column, RowImage};
/// let row = [("id", Some("7")), ("category_id", None)];
/// assert_eq!(row.column("id"), Column::Text("7"));
/// assert_eq!(row.column("category_id"), Column::Null);
/// assert_eq!(row.column("price"), Column::Absent);
/// ```
impl<const N: usize> RowImage for [(&str, Option<&str>); N] {
    fn column(&self, name: &str) -> Column<'_> {
        pairs_column(self, name)
    }
}

/// Same as the array impl, for a `Vec` of `(column, value)` pairs.
impl RowImage for Vec<(&str, Option<&str>)> {
    fn column(&self, name: &str) -> Column<'_> {
        pairs_column(self, name)
    }
}

fn pairs_column<'a>(pairs: &'a [(&str, Option<&str>)], name: &str) -> Column<'a> {
    match pairs.iter().find(|(n, _)| *n == name) {
        Some((_, Some(v))) => Column::Text(v),
        Some((_, None)) => Column::Null,
        None => Column::Absent,
    }
}

/// An owned row image built column by column; handy in tests and for input formats that are not
/// pgoutput (e.g. a Debezium envelope's `before`/`after` objects).
///
/// ```
/// use cacheclear_rules::{Column, MapRow, RowImage};
/// let row = MapRow::new().text("id", "7").null("category_id").unchanged_toast("body");
/// assert_eq!(row.column("id"), Column::Text("7"));
/// assert_eq!(row.column("category_id"), Column::Null);
/// assert_eq!(row.column("body"), Column::UnchangedToast);
/// assert_eq!(row.column("price"), Column::Absent);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapRow {
    columns: Vec<(String, Cell)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Cell {
    Null,
    Text(String),
    UnchangedToast,
}

impl MapRow {
    /// An image with no columns (every lookup is [`Column::Absent`]).
    pub fn new() -> MapRow {
        MapRow::default()
    }

    /// Sets `name` to the text value `value` (replacing an earlier setting).
    pub fn text(self, name: impl Into<String>, value: impl Into<String>) -> MapRow {
        self.set(name.into(), Cell::Text(value.into()))
    }

    /// Sets `name` to SQL NULL.
    pub fn null(self, name: impl Into<String>) -> MapRow {
        self.set(name.into(), Cell::Null)
    }

    /// Marks `name` as an unchanged TOASTed value.
    pub fn unchanged_toast(self, name: impl Into<String>) -> MapRow {
        self.set(name.into(), Cell::UnchangedToast)
    }

    fn set(mut self, name: String, cell: Cell) -> MapRow {
        match self.columns.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = cell,
            None => self.columns.push((name, cell)),
        }
        self
    }
}

impl RowImage for MapRow {
    fn column(&self, name: &str) -> Column<'_> {
        match self.columns.iter().find(|(n, _)| n == name) {
            Some((_, Cell::Text(v))) => Column::Text(v),
            Some((_, Cell::Null)) => Column::Null,
            Some((_, Cell::UnchangedToast)) => Column::UnchangedToast,
            None => Column::Absent,
        }
    }
}
