-- cacheclear protocol script invalidate.lua: KEYS, ARGV and replies in docs/protocol.md (one copy:
-- the Rust crates include this file, other clients load it).
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
