-- KEYS[1] sliding log (zset: slot -> time it counts at), KEYS[2] shared pause,
-- KEYS[3] the on-demand lane's own log (its slots, as in KEYS[1]),
-- KEYS[4] on-demand requests waiting for a slot (zset: slot name -> until when it is kept),
-- KEYS[5] the pace: the time the next slot is due at (GCRA's theoretical arrival time).
-- ARGV[1] limit, ARGV[2] period, ARGV[3] unique slot name (the same on each try of one
-- request), ARGV[4] hold, ARGV[5] lane ('o' on demand, 'b' batch), ARGV[6] slots of a
-- window the on-demand lane takes first, ARGV[7] how long past its wait a waiting
-- on-demand request keeps its place, ARGV[8] slots batch work may take ahead of the
-- pace; times in microseconds.
-- Returns 0 when a slot was taken, else microseconds to wait: negative for a pause.
-- A slot in flight counts at the latest time its request may arrive (now + hold); when
-- every slot is in flight the wait is at least one period from the first release.
-- Lanes: an on-demand request that finds the window full waits in KEYS[4], and every
-- other request leaves it a free slot until it comes back for it (or its place lapses).
-- Once the on-demand lane has taken ARGV[6] slots of the window it waits like batch work,
-- so batch work always keeps the rest of the window.
-- Pace: batch work takes slots evenly, one every period / limit (and ARGV[8] ahead at
-- most), never the whole window at once. A window filled in one burst frees in one burst
-- a period later and stays full in between; paced, its slots free one by one, so the
-- next free slot, which an on-demand request takes first, is never far off. Every slot
-- taken moves the pace on, an on-demand one too.
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
local keep = math.floor((period + hold) / 1000) + 1000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - period)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local first = false
if ARGV[5] == 'o' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - period)
  first = redis.call('ZCARD', KEYS[3]) < tonumber(ARGV[6])
end
local ahead = 0
if not first then
  ahead = redis.call('ZCARD', KEYS[4])
  if redis.call('ZSCORE', KEYS[4], ARGV[3]) then ahead = ahead - 1 end
end
local used = redis.call('ZCARD', KEYS[1])
local interval = period / limit
local due = tonumber(redis.call('GET', KEYS[5]) or '0')
if due < now then due = now end
local paced = 0
if not first then paced = due - tonumber(ARGV[8]) * interval - now end
if used + ahead < limit and paced <= 0 then
  redis.call('ZADD', KEYS[1], now + hold, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], keep)
  local nxt = math.floor(due + interval)
  redis.call('SET', KEYS[5], string.format('%.0f', nxt), 'PX', math.floor((nxt - now) / 1000) + 1000)
  if ARGV[5] == 'o' then
    redis.call('ZADD', KEYS[3], now + hold, ARGV[3])
    redis.call('PEXPIRE', KEYS[3], keep)
    redis.call('ZREM', KEYS[4], ARGV[3])
  end
  return 0
end
-- No slot now. Enough of the oldest slots must leave the window to free one past those
-- kept for waiting on-demand requests; a place kept for one that lapses frees one too.
-- Or the window has room and the pace says when.
local wait = 0
if used + ahead >= limit then
  wait = period
  local leave = used + ahead - limit
  if leave < used then
    local slot = redis.call('ZRANGE', KEYS[1], leave, leave, 'WITHSCORES')
    wait = math.min(tonumber(slot[2]) + period - now, period)
  end
  if ahead > 0 then
    local lapse = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    if lapse[2] then wait = math.min(wait, tonumber(lapse[2]) - now) end
  end
end
wait = math.floor(math.max(1, math.max(wait, paced) + 1))
if first then
  redis.call('ZADD', KEYS[4], now + wait + tonumber(ARGV[7]), ARGV[3])
  redis.call('PEXPIRE', KEYS[4], math.floor((wait + tonumber(ARGV[7])) / 1000) + 1000)
end
return wait
