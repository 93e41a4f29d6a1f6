//! The Lua scripts of the consistency protocol (docs/architecture.md, "The Lua scripts"). Every
//! component that writes a
//! cache key — the invalidation sinks and the client's fills — goes through these, so the rules
//! ("evict, never update"; "a fill never beats an invalidation"; "every key has a TTL") hold in
//! one place.
//!
//! All LSNs are passed and stored as [`crate::Lsn::to_fixed_hex`] strings and compared as strings.
//! Lua's numbers are doubles, exact only up to 2^53, and LSNs are 64-bit.
//!
//! Scripts run with `redis::Script`, which sends `EVALSHA` and, on `NOSCRIPT`, loads the script
//! and sends it again, so a restarted or failed-over Redis needs no preloading.
//!
//! The script bodies live in `crates/protocol/lua/*.lua`, one file per script, included here with
//! `include_str!`: clients in other languages load the same files (docs/protocol.md), so there is
//! one copy.

use redis::Script;

/// Source of [`invalidate`]. `KEYS` are triples `{K}`, `{K}:lease`, `{K}:fence` for any number of
/// cache keys; `ARGV[1]` is the fence TTL in ms and `ARGV[1 + j]` the commit LSN (fixed hex) of the
/// `j`-th triple, so one call can carry keys of many transactions.
/// Per key: delete value and lease; fence = max(fence, lsn), TTL refreshed. Idempotent and
/// commutative: replays and reordering leave the same state. Returns the number of cache keys.
///
/// In Redis Cluster every key of one call must hash to one slot: the sinks group by slot.
pub const INVALIDATE_LUA: &str = include_str!("../lua/invalidate.lua");

/// Source of [`fill`]. `KEYS`: `{K}`, `{K}:lease`, `{K}:fence`. `ARGV[1]` lease token,
/// `ARGV[2]` version the loader read at (fixed-hex LSN, or empty when reading the primary under
/// the lease), `ARGV[3]` the envelope bytes, `ARGV[4]` the value TTL in ms (> 0).
///
/// Writes the value only if the lease still holds our token AND the fence is not newer than the
/// version. Releases our lease in every case where it is still ours (compare-and-delete).
/// Returns [`FILLED`], [`LEASE_LOST`] or [`FENCED`].
///
/// The value `SET` is the script's first write on purpose: Redis refuses a script with `OOM` at
/// its first write that may grow memory, so under `maxmemory` with nothing evictable the fill
/// fails cleanly (nothing written, lease untouched — the client then releases it) instead of
/// deleting the lease and pushing memory past the limit.
pub const FILL_LUA: &str = include_str!("../lua/fill.lua");

/// Source of [`release`]. `KEYS[1]` `{K}:lease`, `ARGV[1]` token: delete the lease only if it
/// still holds our token. Returns 1 if released, 0 if it was no longer ours.
pub const RELEASE_LUA: &str = include_str!("../lua/release.lua");

/// Source of [`watermark`]. `KEYS`: `{cacheclear.ns:N}:watermark`, `{cacheclear.ns:N}:epoch`.
/// `ARGV`: `[1]` the acknowledged commit LSN (fixed hex), `[2]` its commit time in µs, `[3]` the
/// end-to-end lag in ms, `[4]` the epoch the pipeline streams under, `[5]` the watermark TTL in ms.
///
/// Writes the watermark ([`crate::Watermark`]) only while the namespace's epoch is still the
/// pipeline's: returns [`WATERMARK_WRITTEN`]; [`WATERMARK_EPOCH_MISSING`] when the epoch key is
/// absent (Redis restarted and lost it: the pipeline opens a new epoch and goes on); or
/// [`WATERMARK_EPOCH_CHANGED`] when it holds another epoch (another pipeline bumped it: this one
/// stops, and its restart opens a new epoch before streaming). The LSN only moves
/// forward; `written_ms` is Redis `TIME` in ms, so readers age the watermark by the clock of the
/// Redis that stored it, never by their own.
pub const WATERMARK_LUA: &str = include_str!("../lua/watermark.lua");

/// Source of [`open_epoch`]. `KEYS`: `{cacheclear.ns:N}:epoch`, `{cacheclear.ns:N}:origin`,
/// `{cacheclear.ns:N}:watermark`. `ARGV`: `[1]` the origin `system_identifier/timeline` of the
/// server about to be streamed from, `[2]` a gap the pipeline already knows of (`new_slot`,
/// `slot_lost`) or empty, `[3]` `1` when the slot's continuity across an origin change is shown
/// (a PostgreSQL 17 failover slot), else empty.
///
/// Bumps the epoch when `ARGV[2]` names a gap, when the epoch key is absent (`epoch_missing`),
/// or when the origin changed without continuity (`origin_changed`; an absent origin counts as
/// changed). The new epoch is `max(previous + 1, Redis TIME in ms)`, so it exceeds every
/// earlier epoch even when the key was lost. A bump deletes the watermark (it described the old
/// epoch). The origin is stored in every case. Returns `{epoch, reason}` (reason empty: no bump).
///
/// Bus mode (the invalidator applying a [`crate::BusControl::Epoch`] record, which arrives once
/// per partition) adds `KEYS[4]` `{cacheclear.ns:N}:opened` (the newest source start applied),
/// `KEYS[5]` `{cacheclear.ns:N}:partitions`, `KEYS[6]` `{cacheclear.ns:N}:bumped_open` (the
/// newest start whose record bumped the epoch) and `ARGV[4]` the record's `open` id (µs at the
/// source's start, compared as numbers). A copy of the start in `opened` changes nothing. A
/// record of an *earlier* start (its partition lagged behind another that already delivered a
/// later one) changes nothing either — unless it names a gap that no bump at or after its start
/// covers, which then bumps without moving `opened` back: a bump makes every value filled before
/// it a miss, so it covers every gap that happened before it. A *newer* start is applied as
/// above; `opened` becomes its id and the partitions' watermark progress is cleared.
pub const OPEN_EPOCH_LUA: &str = include_str!("../lua/open_epoch.lua");

/// Source of [`bus_watermark`]: the invalidator applying a [`crate::BusControl::Watermark`]
/// record of one partition. `KEYS`: `{cacheclear.ns:N}:watermark`, `:epoch`, `:origin`,
/// `:opened`, `:partitions`, `:bumped_open`. `ARGV`: `[1]` the record's `open` id, `[2]` its origin, `[3]` the
/// partition number, `[4]` the topic's partition count, `[5]` the LSN (fixed hex), `[6]` its
/// commit time in µs, `[7]` the source's lag in ms, `[8]` the watermark TTL in ms.
///
/// - Epoch or `opened` absent (Redis lost the namespace): opens a new epoch in place
///   (`max(1, Redis TIME in ms)`, reason `epoch_missing`) under this record's open (`KEYS[6]`
///   `:bumped_open` becomes its id), as the Redis sink's publisher does; clients bypassed meanwhile (no epoch), so nothing was filled under
///   the lost one.
/// - `opened` holds another id: a record of an earlier start; ignored.
/// - Otherwise records the partition's progress (its LSN only moves forward) and, once every
///   partition `0 .. ARGV[4]` has delivered a watermark under this open, writes the namespace's
///   watermark at the *smallest* of their LSNs (or the stored one, if larger: the LSN only moves
///   forward) — every commit up to it is applied on every partition — with
///   `lag_ms = max(source lag, Redis TIME − commit time)`: the one comparison of two hosts'
///   clocks in the protocol (PostgreSQL's commit timestamp against Redis's `TIME`;
///   docs/architecture.md says why and what a skew does). Returns `{1, reason, lag_ms}` when
///   written, `{0, reason, 0}` while a partition has not reported yet, `{-1, '', 0}` for an
///   earlier open (reason: `epoch_missing` or empty).
pub const BUS_WATERMARK_LUA: &str = include_str!("../lua/bus_watermark.lua");

/// The bus-mode watermark script ([`BUS_WATERMARK_LUA`]).
pub fn bus_watermark() -> Script {
    Script::new(BUS_WATERMARK_LUA)
}

/// Source of [`read_namespace`]. `KEYS`: `{cacheclear.ns:N}:watermark`, `{cacheclear.ns:N}:epoch`.
/// Returns `{watermark, epoch, now_ms}`: the stored watermark and epoch (empty strings when
/// absent) and Redis `TIME` in ms, all from the one node that holds them, in one round trip.
pub const READ_NAMESPACE_LUA: &str = include_str!("../lua/read_namespace.lua");

/// [`WATERMARK_LUA`] returned: the watermark was written.
pub const WATERMARK_WRITTEN: i64 = 1;
/// [`WATERMARK_LUA`] returned: the namespace has no epoch (Redis lost it); nothing written.
pub const WATERMARK_EPOCH_MISSING: i64 = 0;
/// [`WATERMARK_LUA`] returned: the namespace's epoch is another one; nothing written.
pub const WATERMARK_EPOCH_CHANGED: i64 = -1;

/// The watermark script ([`WATERMARK_LUA`]).
pub fn watermark() -> Script {
    Script::new(WATERMARK_LUA)
}

/// The epoch script run before streaming ([`OPEN_EPOCH_LUA`]).
pub fn open_epoch() -> Script {
    Script::new(OPEN_EPOCH_LUA)
}

/// The clients' namespace read ([`READ_NAMESPACE_LUA`]).
pub fn read_namespace() -> Script {
    Script::new(READ_NAMESPACE_LUA)
}

/// [`FILL_LUA`] returned: the value was written.
pub const FILLED: i64 = 1;
/// [`FILL_LUA`] returned: our lease expired or was deleted by an invalidation; nothing written.
pub const LEASE_LOST: i64 = 0;
/// [`FILL_LUA`] returned: the fence is newer than the version read; nothing written.
pub const FENCED: i64 = -1;

/// The invalidation script ([`INVALIDATE_LUA`]).
pub fn invalidate() -> Script {
    Script::new(INVALIDATE_LUA)
}

/// The fenced fill script ([`FILL_LUA`]).
pub fn fill() -> Script {
    Script::new(FILL_LUA)
}

/// The compare-and-delete lease release script ([`RELEASE_LUA`]).
pub fn release() -> Script {
    Script::new(RELEASE_LUA)
}
