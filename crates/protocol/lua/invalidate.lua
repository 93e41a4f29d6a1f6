-- cacheclear protocol script invalidate.lua: KEYS, ARGV and replies in docs/protocol.md (one copy:
-- the Rust crates include this file, other clients load it).
-- Per key one SET … GET (Redis >= 6.2) raises the fence; the values and leases go in one DEL per
-- 500 keys; one LSN may serve every key. Redis's own CPU per key is what bounds a bulk eviction
-- (README, "Against the floor").
local ttl = ARGV[1]
local one = #ARGV == 2
local n = 0
local names = {}
for i = 1, #KEYS, 3 do
  n = n + 1
  local lsn = one and ARGV[2] or ARGV[n + 1]
  local fence = redis.call('SET', KEYS[i + 2], lsn, 'PX', ttl, 'GET')
  if fence and fence > lsn then
    redis.call('SET', KEYS[i + 2], fence, 'PX', ttl)
  end
  names[#names + 1] = KEYS[i]
  names[#names + 1] = KEYS[i + 1]
  if #names >= 1000 then
    redis.call('DEL', unpack(names))
    names = {}
  end
end
if #names > 0 then
  redis.call('DEL', unpack(names))
end
return n
