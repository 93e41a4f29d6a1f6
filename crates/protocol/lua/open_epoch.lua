-- cacheclear protocol script open_epoch.lua: KEYS, ARGV and replies in docs/protocol.md (one copy:
-- the Rust crates include this file, other clients load it).
local epoch = redis.call('GET', KEYS[1])
local bus = #KEYS >= 6
local newer = true
if bus then
  -- Bus mode: this record is one of the copies, one per partition, of the epoch record of the
  -- source start `ARGV[4]` (µs at start). Copies of one start, and of earlier starts arriving
  -- after a later one on another partition, change nothing, except an earlier start's gap that
  -- no later bump covers yet.
  local this = tonumber(ARGV[4])
  local opened = tonumber(redis.call('GET', KEYS[4]) or '0')
  if epoch and this == opened then
    return {epoch, ''}
  end
  newer = this > opened
  if epoch and not newer then
    if ARGV[2] == '' or this <= tonumber(redis.call('GET', KEYS[6]) or '0') then
      return {epoch, ''}
    end
  end
end
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
  if bus and tonumber(ARGV[4]) > tonumber(redis.call('GET', KEYS[6]) or '0') then
    redis.call('SET', KEYS[6], ARGV[4])
  end
end
if newer then
  redis.call('SET', KEYS[2], ARGV[1])
end
if bus and newer then
  redis.call('SET', KEYS[4], ARGV[4])
  redis.call('DEL', KEYS[5])
end
return {epoch, reason}
