-- cacheclear protocol script watermark.lua: KEYS, ARGV and replies in docs/protocol.md (one copy:
-- the Rust crates include this file, other clients load it).
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
