//! The contract every cacheclear component shares: how a cache key is laid out in Redis, the Lua
//! scripts that invalidate and fill it, and the invalidation record that flows from the CDC source
//! to the sinks.
//!
//! Architecture: `docs/architecture.md`, "Redis key layout" and "The Lua scripts". Per cache key
//! `K` three Redis keys share one hash tag, so they
//! always sit in one cluster slot and one Lua script can touch all three:
//!
//! | Redis key   | holds                                                  | TTL                        |
//! |-------------|--------------------------------------------------------|----------------------------|
//! | `{K}`       | the value envelope (payload + version it was read at)  | base ± jitter (client)     |
//! | `{K}:lease` | the token of the one loader allowed to fill            | short (lease, ms)          |
//! | `{K}:fence` | highest commit LSN invalidated for `K` (tombstone)     | longer than replica lag    |
//!
//! ```
//! use cacheclear_protocol::{KeyLayout, Lsn};
//! let k = KeyLayout::new("product:42").unwrap();
//! assert_eq!(k.value(), "{product:42}");
//! assert_eq!(k.lease(), "{product:42}:lease");
//! assert_eq!(k.fence(), "{product:42}:fence");
//! assert_eq!(Lsn(0x16B_6C50).to_fixed_hex(), "00000000016B6C50");
//! ```

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

pub mod batch;
mod check;
mod config;
pub mod connect;
mod invalidation;
mod layout;
mod lsn;
pub mod namespace;
pub mod record;
pub mod scripts;
pub mod sink;

pub use batch::{Batch, CommittedTxn, KeyArena, TableEviction, now_us};
pub use check::{Check, Status};
pub use config::{ConfigError, is_secret_property, redact_properties, redact_url};
pub use invalidation::{Invalidation, Op};
pub use layout::{KeyError, KeyLayout};
pub use lsn::{Lsn, LsnParseError};
pub use namespace::{NamespaceLayout, Watermark};
pub use record::{BusControl, BusRecord, CONTROL_KEY_PREFIX, RecordError};
pub use sink::{EpochChanged, EpochOpened, Sink, SinkError};
