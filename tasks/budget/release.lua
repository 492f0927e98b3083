-- KEYS[1] sliding log; ARGV[1] slot name. The slot's request has ended: it counts at now,
-- if that is earlier than the time it was logged at. Run twice, the second run finds the
-- slot already at or before its now and changes nothing.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if at and tonumber(at) > now then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  return 1
end
return 0
