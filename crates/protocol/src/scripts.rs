//! The Lua scripts of the consistency protocol (docs/architecture.md, "The Lua scripts"). Every
//! component that writes a
//! cache key — the invalidation sinks and the client's fills — goes through these, so the rules
//! ("evict, never update"; "a fill never beats an invalidation"; "every key has a TTL") hold in
//! one place.
//!
//! All LSNs are passed and stored as [`crate::Lsn::to_fixed_hex`] strings and compared as strings.
//! Lua's numbers are doubles, exact only up to 2^53, and LSNs are 64-bit.
//!
//! Scripts run with `redis::Script`, which sends `EVALSHA` and falls back to `EVAL` on
//! `NOSCRIPT`, so a restarted or failed-over Redis needs no preloading.

use redis::Script;

/// Source of [`invalidate`]. `KEYS` are triples `{K}`, `{K}:lease`, `{K}:fence` for any number of
/// cache keys; `ARGV[1]` is the fence TTL in ms and `ARGV[1 + j]` the commit LSN (fixed hex) of the
/// `j`-th triple, so one call can carry keys of many transactions.
/// Per key: delete value and lease; fence = max(fence, lsn), TTL refreshed. Idempotent and
/// commutative: replays and reordering leave the same state. Returns the number of cache keys.
///
/// In Redis Cluster every key of one call must hash to one slot: the sinks group by slot.
pub const INVALIDATE_LUA: &str = r#"
local ttl = ARGV[1]
local n = 0
for i = 1, #KEYS, 3 do
  n = n + 1
  local lsn = ARGV[n + 1]
  redis.call('DEL', KEYS[i], KEYS[i + 1])
  local fence = redis.call('GET', KEYS[i + 2])
  if fence and fence > lsn then
    lsn = fence
  end
  redis.call('SET', KEYS[i + 2], lsn, 'PX', ttl)
end
return n
"#;

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
pub const FILL_LUA: &str = r#"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
if ARGV[2] ~= '' then
  local fence = redis.call('GET', KEYS[3])
  if fence and fence > ARGV[2] then
    redis.call('DEL', KEYS[2])
    return -1
  end
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
redis.call('DEL', KEYS[2])
return 1
"#;

/// Source of [`release`]. `KEYS[1]` `{K}:lease`, `ARGV[1]` token: delete the lease only if it
/// still holds our token. Returns 1 if released, 0 if it was no longer ours.
pub const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

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
