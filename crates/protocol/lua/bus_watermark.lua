-- cacheclear protocol script bus_watermark.lua: KEYS, ARGV and replies in docs/protocol.md (one copy:
-- the Rust crates include this file, other clients load it).
local epoch = redis.call('GET', KEYS[2])
local opened = redis.call('GET', KEYS[4])
local reason = ''
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not epoch or not opened then
  local next = tonumber(epoch or '0') + 1
  if now > next then
    next = now
  end
  epoch = string.format('%d', next)
  redis.call('SET', KEYS[2], epoch)
  redis.call('SET', KEYS[3], ARGV[2])
  redis.call('SET', KEYS[4], ARGV[1])
  redis.call('SET', KEYS[6], ARGV[1])
  redis.call('DEL', KEYS[1], KEYS[5])
  reason = 'epoch_missing'
elseif opened ~= ARGV[1] then
  return {-1, '', 0}
end
local mine = ARGV[5] .. ' ' .. ARGV[6] .. ' ' .. ARGV[7]
local held = redis.call('HGET', KEYS[5], ARGV[3])
if held and string.sub(held, 1, 16) > ARGV[5] then
  mine = held
end
redis.call('HSET', KEYS[5], ARGV[3], mine)
local low = nil
for p = 0, tonumber(ARGV[4]) - 1 do
  local v = redis.call('HGET', KEYS[5], tostring(p))
  if not v then
    return {0, reason, 0}
  end
  if not low or string.sub(v, 1, 16) < string.sub(low, 1, 16) then
    low = v
  end
end
local lsn, commit_us, lag = string.match(low, '^(%x+) (%-?%d+) (%d+)$')
local behind = now - math.floor(tonumber(commit_us) / 1000)
if behind > tonumber(lag) then
  lag = string.format('%d', behind)
end
local old = redis.call('GET', KEYS[1])
if old and string.sub(old, 1, 16) > lsn then
  lsn = string.sub(old, 1, 16)
end
redis.call('SET', KEYS[1], lsn .. ' ' .. commit_us .. ' ' .. lag .. ' ' .. string.format('%d', now) .. ' ' .. epoch, 'PX', ARGV[8])
return {1, reason, tonumber(lag)}
