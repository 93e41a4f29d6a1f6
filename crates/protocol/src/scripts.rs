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
pub const WATERMARK_LUA: &str = r#"
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  return 0
end
if epoch ~= ARGV[4] then
  return -1
end
local lsn = ARGV[1]
local old = redis.call('GET', KEYS[1])
if old then
  local o = string.sub(old, 1, 16)
  if o > lsn then
    lsn = o
  end
end
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('SET', KEYS[1], lsn .. ' ' .. ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. now .. ' ' .. ARGV[4], 'PX', ARGV[5])
return 1
"#;

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
pub const OPEN_EPOCH_LUA: &str = r#"
local epoch = redis.call('GET', KEYS[1])
local origin = redis.call('GET', KEYS[2])
local reason = ARGV[2]
if reason == '' then
  if not epoch then
    reason = 'epoch_missing'
  elseif origin ~= ARGV[1] and ARGV[3] ~= '1' then
    reason = 'origin_changed'
  end
end
if reason ~= '' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local next = tonumber(epoch or '0') + 1
  if now > next then
    next = now
  end
  epoch = string.format('%d', next)
  redis.call('SET', KEYS[1], epoch)
  redis.call('DEL', KEYS[3])
end
redis.call('SET', KEYS[2], ARGV[1])
return {epoch, reason}
"#;

/// Source of [`read_namespace`]. `KEYS`: `{cacheclear.ns:N}:watermark`, `{cacheclear.ns:N}:epoch`.
/// Returns `{watermark, epoch, now_ms}`: the stored watermark and epoch (empty strings when
/// absent) and Redis `TIME` in ms, all from the one node that holds them, in one round trip.
pub const READ_NAMESPACE_LUA: &str = r#"
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
return {redis.call('GET', KEYS[1]) or '', redis.call('GET', KEYS[2]) or '', now}
"#;

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
