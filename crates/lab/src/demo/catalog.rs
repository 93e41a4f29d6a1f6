//! The demo's shop in PostgreSQL: the catalog, the flash sale, inventory and orders, and the SQL
//! every shopper and the admin job run.
//!
//! Everything lives in the schema `cacheclear_demo`, dropped and recreated at the start, so a
//! database given with `--postgres-url` keeps its own tables untouched.
//!
//! Stock is kept in `inventory`, not in `product`: stock decrements are data that must never be
//! stale (docs/architecture.md, "Data that must never be stale") and never go through the cache,
//! and keeping them out of the cached row
//! means an order does not evict the product page of everyone else.

use std::collections::BTreeMap;

use anyhow::Context;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, IsolationLevel, Statement};

/// The schema holding the demo's tables.
pub(super) const SCHEMA: &str = "cacheclear_demo";
/// The table the pipeline watches (rule `product:{id}`).
pub(super) const PRODUCT_TABLE: &str = "cacheclear_demo.product";
/// Name of the replication slot and publication of the cacheclear run.
pub(super) const SLOT: &str = "cacheclear_demo";
/// Units of stock per product: enough that no product sells out during a run.
const STOCK: i32 = 1_000_000;
/// Categories of the catalog.
const CATEGORIES: u32 = 50;

/// One product page, as cached: the row of `cacheclear_demo.product`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Product {
    /// Primary key; also the product's popularity rank (1 = most viewed).
    pub id: i32,
    /// Stock-keeping unit, `SKU-0000042`.
    pub sku: String,
    /// Display name.
    pub name: String,
    /// Display text (the catalog-edit job rewrites it now and then).
    pub description: String,
    /// Category.
    pub category_id: i32,
    /// Full price, cents.
    pub list_price_cents: i64,
    /// Discounted price while on sale, cents; `NULL` otherwise.
    pub sale_price_cents: Option<i64>,
    /// Whether the sale price applies.
    pub on_sale: bool,
    /// Last change of the row, as text.
    pub updated_at: String,
}

impl Product {
    /// The price a shopper sees and puts in the cart.
    pub(super) fn price_cents(&self) -> i64 {
        match (self.on_sale, self.sale_price_cents) {
            (true, Some(p)) => p,
            _ => self.list_price_cents,
        }
    }
}

/// Drops and recreates the schema and seeds `products` products, the first `sale_items` of them
/// (the most viewed) on sale at 70% of their list price.
///
/// # Errors
/// A statement failed; the message names the step.
pub(super) async fn create(db: &Client, products: u32, sale_items: u32) -> anyhow::Result<()> {
    drop_replication(db).await?;
    db.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
         CREATE SCHEMA {SCHEMA};
         CREATE TABLE {SCHEMA}.category (id int PRIMARY KEY, name text NOT NULL);
         CREATE TABLE {SCHEMA}.product (
             id int PRIMARY KEY,
             sku text NOT NULL UNIQUE,
             name text NOT NULL,
             description text NOT NULL,
             category_id int NOT NULL REFERENCES {SCHEMA}.category (id),
             list_price_cents bigint NOT NULL CHECK (list_price_cents > 0),
             sale_price_cents bigint CHECK (sale_price_cents > 0),
             on_sale boolean NOT NULL DEFAULT false,
             updated_at timestamptz NOT NULL DEFAULT now(),
             CHECK (NOT on_sale OR sale_price_cents IS NOT NULL)
         );
         -- The sale's terms, kept after the sale ends (to re-run it, and to audit orders).
         CREATE TABLE {SCHEMA}.sale_item (
             product_id int PRIMARY KEY REFERENCES {SCHEMA}.product (id),
             sale_price_cents bigint NOT NULL
         );
         CREATE TABLE {SCHEMA}.inventory (
             product_id int PRIMARY KEY REFERENCES {SCHEMA}.product (id),
             stock int NOT NULL CHECK (stock >= 0)
         );
         -- One row per order line; `snap` is the checkout transaction's snapshot, which tells
         -- afterwards which prices were valid when it committed.
         CREATE TABLE {SCHEMA}.orders (
             id bigserial PRIMARY KEY,
             shopper int NOT NULL,
             product_id int NOT NULL REFERENCES {SCHEMA}.product (id),
             quantity int NOT NULL CHECK (quantity > 0),
             charged_cents bigint NOT NULL,
             snap pg_snapshot NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now()
         );
         INSERT INTO {SCHEMA}.category
           SELECT g, 'category ' || g FROM generate_series(1, {CATEGORIES}) g;
         INSERT INTO {SCHEMA}.product (id, sku, name, description, category_id, list_price_cents)
           SELECT g, 'SKU-' || lpad(g::text, 7, '0'), 'product ' || g,
                  'The product number ' || g || ' of the cacheclear demo shop.',
                  1 + g % {CATEGORIES}, 500 + (g::bigint * 7919) % 20000
           FROM generate_series(1, {products}) g;
         INSERT INTO {SCHEMA}.sale_item
           SELECT id, list_price_cents * 70 / 100 FROM {SCHEMA}.product WHERE id <= {sale_items};
         INSERT INTO {SCHEMA}.inventory SELECT id, {STOCK} FROM {SCHEMA}.product;"
    ))
    .await
    .context("creating the demo catalog (schema cacheclear_demo)")?;
    Ok(())
}

/// Starts the sale again, restocks, and empties the orders: the state every strategy run starts
/// from.
///
/// # Errors
/// A statement failed.
pub(super) async fn reset_sale(db: &Client) -> anyhow::Result<()> {
    db.batch_execute(&format!(
        "UPDATE {SCHEMA}.product p SET on_sale = true, sale_price_cents = s.sale_price_cents, updated_at = now()
           FROM {SCHEMA}.sale_item s WHERE s.product_id = p.id;
         UPDATE {SCHEMA}.inventory SET stock = {STOCK};
         TRUNCATE {SCHEMA}.orders;"
    ))
    .await
    .context("resetting the sale")?;
    // VACUUM cannot run inside the implicit transaction of a multi-statement batch.
    for table in ["product", "inventory", "orders"] {
        db.batch_execute(&format!("VACUUM ANALYZE {SCHEMA}.{table}"))
            .await
            .with_context(|| format!("VACUUM ANALYZE {SCHEMA}.{table}"))?;
    }
    Ok(())
}

/// Drops the demo's replication slot (if inactive) and publication.
///
/// # Errors
/// A statement failed (for example the slot is still in use).
pub(super) async fn drop_replication(db: &Client) -> anyhow::Result<()> {
    db.batch_execute(&format!(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{SLOT}';
         DROP PUBLICATION IF EXISTS {SLOT};"
    ))
    .await
    .context("dropping the demo's replication slot and publication")?;
    Ok(())
}

/// Drops everything the demo created.
///
/// # Errors
/// A statement failed.
pub(super) async fn drop_all(db: &Client) -> anyhow::Result<()> {
    drop_replication(db).await?;
    db.batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        .await
        .context("dropping schema cacheclear_demo")?;
    Ok(())
}

/// A shopper's prepared statements.
pub(super) struct Statements {
    load: Statement,
    prices: Statement,
    take_stock: Statement,
    insert_orders: Statement,
}

impl Statements {
    /// Prepares them on `db`.
    ///
    /// # Errors
    /// A statement does not prepare (the schema is missing).
    pub(super) async fn prepare(db: &Client) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            load: db
                .prepare(&format!(
                    "SELECT id, sku, name, description, category_id, list_price_cents,
                            sale_price_cents, on_sale, updated_at::text
                     FROM {SCHEMA}.product WHERE id = $1"
                ))
                .await?,
            prices: db
                .prepare(&format!(
                    "SELECT id, CASE WHEN on_sale THEN sale_price_cents ELSE list_price_cents END
                     FROM {SCHEMA}.product WHERE id = ANY($1)"
                ))
                .await?,
            take_stock: db
                .prepare(&format!(
                    "UPDATE {SCHEMA}.inventory SET stock = stock - $2
                     WHERE product_id = $1 AND stock >= $2"
                ))
                .await?,
            insert_orders: db
                .prepare(&format!(
                    "INSERT INTO {SCHEMA}.orders (shopper, product_id, quantity, charged_cents, snap)
                     SELECT $1, u.id, u.qty, u.price, pg_current_snapshot()
                     FROM unnest($2::int[], $3::int[], $4::bigint[]) AS u (id, qty, price)"
                ))
                .await?,
        })
    }
}

/// Reads product `id` from the database: the loader of both strategies.
///
/// # Errors
/// The query failed, or there is no such product.
pub(super) async fn load_product(db: &Client, st: &Statements, id: i32) -> anyhow::Result<Product> {
    let row = db
        .query_opt(&st.load, &[&id])
        .await
        .with_context(|| format!("reading product {id}"))?
        .with_context(|| format!("product {id} does not exist"))?;
    Ok(Product {
        id: row.try_get(0)?,
        sku: row.try_get(1)?,
        name: row.try_get(2)?,
        description: row.try_get(3)?,
        category_id: row.try_get(4)?,
        list_price_cents: row.try_get(5)?,
        sale_price_cents: row.try_get(6)?,
        on_sale: row.try_get(7)?,
        updated_at: row.try_get(8)?,
    })
}

/// One cart line at checkout: the product, how many, and the price the shopper saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Line {
    /// The product.
    pub product_id: i32,
    /// Units.
    pub quantity: i32,
    /// Unit price the shopper saw (and expects to pay), cents.
    pub price_cents: i64,
}

/// How one checkout ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum CheckoutEnd {
    /// The order was placed and charged at the prices of the cart, which were the database's.
    Charged,
    /// A price changed since the shopper saw it: nothing was charged; here are the current
    /// prices (product id → cents), which the shopper is shown.
    PriceChanged(BTreeMap<i32, i64>),
    /// A product ran out of stock (does not happen with the demo's stock levels).
    OutOfStock(i32),
}

/// Attempts before a checkout gives up on serialization failures.
pub(super) const MAX_CHECKOUT_ATTEMPTS: u32 = 12;

/// The reference checkout (docs/architecture.md, "Data that must never be stale"): in a
/// SERIALIZABLE transaction, re-read every price from
/// the database (never the cache), refuse the cart if a price changed (returning the current
/// prices), take the stock, insert the order lines with the charged price and the transaction's
/// snapshot, commit. Serialization failures (SQLSTATE 40001) and deadlocks (40P01) are retried
/// with doubling, jittered backoff, up to [`MAX_CHECKOUT_ATTEMPTS`] attempts.
///
/// Returns how it ended and how many attempts were retried.
///
/// # Errors
/// Any other database error, or the last serialization failure when the attempts ran out.
pub(super) async fn checkout(
    db: &mut Client,
    st: &Statements,
    shopper: i32,
    lines: &[Line],
    rng: &mut super::zipf::Rng,
) -> Result<(CheckoutEnd, u32), tokio_postgres::Error> {
    // Lines in product order, merged: locks are taken in one order, so checkouts never deadlock
    // with each other.
    let mut merged: BTreeMap<i32, Line> = BTreeMap::new();
    for l in lines {
        merged
            .entry(l.product_id)
            .and_modify(|m| m.quantity += l.quantity)
            .or_insert(*l);
    }
    let lines: Vec<Line> = merged.into_values().collect();
    let mut backoff_ms = 1.0_f64;
    let mut retries = 0;
    loop {
        match try_checkout(db, st, shopper, &lines).await {
            Ok(end) => return Ok((end, retries)),
            Err(e) if retryable(&e) && retries + 1 < MAX_CHECKOUT_ATTEMPTS => {
                retries += 1;
                let pause = backoff_ms * (0.5 + 0.5 * rng.unit());
                tokio::time::sleep(std::time::Duration::from_secs_f64(pause / 1000.0)).await;
                backoff_ms = (backoff_ms * 2.0).min(100.0);
            }
            Err(e) => return Err(e),
        }
    }
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

async fn try_checkout(
    db: &mut Client,
    st: &Statements,
    shopper: i32,
    lines: &[Line],
) -> Result<CheckoutEnd, tokio_postgres::Error> {
    let tx = db
        .build_transaction()
        .isolation_level(IsolationLevel::Serializable)
        .start()
        .await?;
    let ids: Vec<i32> = lines.iter().map(|l| l.product_id).collect();
    let mut current = BTreeMap::new();
    for row in tx.query(&st.prices, &[&ids]).await? {
        current.insert(row.try_get::<_, i32>(0)?, row.try_get::<_, i64>(1)?);
    }
    if lines
        .iter()
        .any(|l| current.get(&l.product_id) != Some(&l.price_cents))
    {
        tx.rollback().await?;
        return Ok(CheckoutEnd::PriceChanged(current));
    }
    for l in lines {
        if tx
            .execute(&st.take_stock, &[&l.product_id, &l.quantity])
            .await?
            == 0
        {
            tx.rollback().await?;
            return Ok(CheckoutEnd::OutOfStock(l.product_id));
        }
    }
    let qty: Vec<i32> = lines.iter().map(|l| l.quantity).collect();
    // The charged price is the one just read from the database in this transaction.
    let price: Vec<i64> = lines.iter().map(|l| current[&l.product_id]).collect();
    tx.execute(&st.insert_orders, &[&shopper, &ids, &qty, &price])
        .await?;
    tx.commit().await?;
    Ok(CheckoutEnd::Charged)
}

/// When the sale-end transaction ran, by this process's monotonic clock.
#[derive(Debug, Clone)]
pub(super) struct SaleEnd {
    /// When `COMMIT` returned: from then on every new snapshot sees the full prices.
    pub visible: std::time::Instant,
    /// The transaction's id (`xid8`, as text).
    pub xid: String,
    /// Products taken off sale.
    pub rows: u64,
}

/// The admin job that ends the sale: one transaction setting every sale item back to its full
/// price. Calls `before_commit(xid)` right before `COMMIT` is sent: no read that started earlier
/// can be stale.
///
/// # Errors
/// A statement failed.
pub(super) async fn end_sale(
    db: &mut Client,
    before_commit: impl FnOnce(&str),
) -> anyhow::Result<SaleEnd> {
    let tx = db.transaction().await.context("sale end: BEGIN")?;
    let rows = tx
        .execute(
            &format!(
                "UPDATE {SCHEMA}.product SET on_sale = false, sale_price_cents = NULL, updated_at = now()
                 WHERE on_sale"
            ),
            &[],
        )
        .await
        .context("sale end: UPDATE")?;
    let xid: String = tx
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .context("sale end: pg_current_xact_id()")?
        .try_get(0)
        .context("sale end: pg_current_xact_id()")?;
    before_commit(&xid);
    tx.commit().await.context("sale end: COMMIT")?;
    let visible = std::time::Instant::now();
    Ok(SaleEnd { visible, xid, rows })
}

/// The catalog-edit job's change: rewrites one product's description.
///
/// # Errors
/// The statement failed.
pub(super) async fn edit_description(db: &Client, id: i32) -> Result<u64, tokio_postgres::Error> {
    db.execute(
        &format!(
            "UPDATE {SCHEMA}.product
             SET description = 'The product number ' || id || ', edited at ' || clock_timestamp(),
                 updated_at = now()
             WHERE id = $1"
        ),
        &[&id],
    )
    .await
}

/// What the orders of a run say, checked in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OrderAudit {
    /// Order lines.
    pub lines: u64,
    /// Order lines charged a price that was not the product's price in the snapshot of the
    /// checkout transaction that committed them: the sale price after the sale-end transaction
    /// was visible to it, or the full price of a sale item before.
    pub wrong_price_lines: u64,
}

/// Audits every order line against the price valid in its checkout's snapshot. `sale_end_xid`
/// is the sale-end transaction (`None`: the sale never ended).
///
/// A SERIALIZABLE transaction commits only if it is equivalent to some serial order; its
/// snapshot says where it falls relative to the sale-end transaction, so the price valid at its
/// commit is the sale price exactly when the sale end is not visible in its snapshot.
///
/// # Errors
/// The query failed.
pub(super) async fn audit_orders(
    db: &Client,
    sale_end_xid: Option<&str>,
) -> anyhow::Result<OrderAudit> {
    let row = db
        .query_one(
            &format!(
                "SELECT count(*),
                        count(*) FILTER (WHERE o.charged_cents <> CASE
                            WHEN s.product_id IS NOT NULL
                                 AND ($1::text IS NULL OR NOT pg_visible_in_snapshot($1::text::xid8, o.snap))
                            THEN s.sale_price_cents
                            ELSE p.list_price_cents END)
                 FROM {SCHEMA}.orders o
                 JOIN {SCHEMA}.product p ON p.id = o.product_id
                 LEFT JOIN {SCHEMA}.sale_item s ON s.product_id = o.product_id"
            ),
            &[&sale_end_xid],
        )
        .await
        .context("auditing the orders")?;
    let lines: i64 = row.try_get(0)?;
    let wrong: i64 = row.try_get(1)?;
    Ok(OrderAudit {
        lines: u64::try_from(lines).unwrap_or(0),
        wrong_price_lines: u64::try_from(wrong).unwrap_or(0),
    })
}
