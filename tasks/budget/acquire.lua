-- KEYS[1] sliding log (zset: slot -> time it counts at), KEYS[2] shared pause.
-- ARGV[1] limit, ARGV[2] period, ARGV[3] unique slot name, ARGV[4] hold; times in microseconds.
-- Returns 0 when a slot was taken, else microseconds to wait: negative for a pause.
-- A slot in flight counts at the latest time its request may arrive (now + hold); when
-- every slot is in flight the wait is at least one period from the first release.
-- Run twice (a retry after a dropped connection): the slot is already in the log, and
-- the second run says so without taking another one.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  return 0
end
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 then
  return -pause * 1000
end
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local hold = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - period)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now + hold, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.floor((period + hold) / 1000) + 1000)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, math.min(tonumber(oldest[2]) + period - now, period) + 1)
