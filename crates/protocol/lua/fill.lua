-- cacheclear protocol script fill.lua: KEYS, ARGV and replies in docs/protocol.md (one copy:
-- the Rust crates include this file, other clients load it).
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
