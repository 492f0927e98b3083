-- Every script gets all of a run's keys, in this order (see JitRun.keys):
-- 1 state hash, 2 queue list, 3 done set, 4 released hash (chunk index -> chunk),
-- 5 released-at zset, 6 finished set, 7 taken hash (chunk index -> id of the task that
-- took it and has not yet confirmed it sent), 8 staged set, 9 owners hash (chunk index ->
-- id of the chunk task minting it), 10 failed hash (user id -> the user's `failed` entry).
-- ARGV[1] is the calling task's id ('' outside a task).
--
-- The books carry no TTL while the run is active (touch() PERSISTs them): volatile-lru
-- evicts only keys that have one. The script that ends the run answers 'ended' after
-- its chunks, and leaves them so: the caller keeps the run's final progress, then gives
-- the books their TTL (JitRun._ended), so that nothing of them goes before that. The
-- state hash counts what the other keys hold (`segments` staged, `queued` chunks,
-- `done_count` users done) from its start (`counted`, stage.lua): a read that finds the
-- two apart knows that a key was lost (JitRun.progress).
--
-- A chunk is handed out in two steps. release() *takes* chunks for the caller (at most
-- `budget` users released but unfinished); the caller publishes each chunk task and then
-- confirms it (SENT), which ends the chunk's taking. mine() returns the chunks this very
-- task took and never confirmed: after a crash between taking and publishing, or when a
-- script's answer was lost on a dropped connection and the call is made again, they come
-- back to the task that must send them, and to no one else. stale(): chunks released
-- longer ago than `stale_after` and never finished, whoever took them (their chunk task
-- was lost): taken again by the caller, and no longer owned by the lost task.
--
-- Run twice (a retry after a dropped connection), every script has the effect of one run:
-- staging is guarded by the staged set, finishing by the finished set, a user's end by the
-- done set, and what the first run took comes back from mine() in the second.

local SENDER = ARGV[1]
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function mine()
  local out = {}
  if SENDER == '' then return out end
  local all = redis.call('HGETALL', KEYS[7])
  for i = 1, #all, 2 do
    if all[i + 1] == SENDER and redis.call('SISMEMBER', KEYS[6], all[i]) == 0 then
      local chunk = redis.call('HGET', KEYS[4], all[i])
      if chunk then table.insert(out, chunk) end
    end
  end
  return out
end
local function release(out)
  local budget = tonumber(redis.call('HGET', KEYS[1], 'budget') or '0')
  while true do
    local inflight = tonumber(redis.call('HGET', KEYS[1], 'inflight') or '0')
    local dispatched = tonumber(redis.call('HGET', KEYS[1], 'dispatched') or '0')
    local pending = inflight + dispatched - redis.call('SCARD', KEYS[3])
    if pending >= budget then break end
    local chunk = redis.call('LPOP', KEYS[2])
    if not chunk then break end
    local index, n = string.match(chunk, '^(%d+)|(%d+)|')
    redis.call('HINCRBY', KEYS[1], 'inflight', tonumber(n))
    redis.call('HINCRBY', KEYS[1], 'queued', -1)
    redis.call('HSET', KEYS[4], index, chunk)
    redis.call('ZADD', KEYS[5], now(), index)
    redis.call('HSET', KEYS[7], index, SENDER)
    table.insert(out, chunk)
  end
  return out
end
local function forget(index)
  redis.call('HDEL', KEYS[4], index)
  redis.call('ZREM', KEYS[5], index)
  redis.call('HDEL', KEYS[7], index)
  redis.call('HDEL', KEYS[9], index)
end
local function stale(out, limit)
  local after = tonumber(redis.call('HGET', KEYS[1], 'stale_after') or '0')
  if after <= 0 then return out end
  local t = now()
  local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', t - after, 'LIMIT', 0, limit)
  for _, index in ipairs(old) do
    local chunk = redis.call('HGET', KEYS[4], index)
    if chunk and redis.call('SISMEMBER', KEYS[6], index) == 0 then
      redis.call('ZADD', KEYS[5], t, index)
      redis.call('HSET', KEYS[7], index, SENDER)
      redis.call('HDEL', KEYS[9], index)
      table.insert(out, chunk)
    else
      forget(index)
    end
  end
  return out
end
-- A run a coordinator drives (`coordinated`, the nightly run's) ends when it says so
-- (JitRun.close): its books outlive the last user's end until its summary is written.
local function ended()
  local state = redis.call('HMGET', KEYS[1], 'total', 'failed', 'inflight', 'coordinated')
  local total = tonumber(state[1] or '0')
  return total > 0 and state[4] ~= '1'
    and redis.call('SCARD', KEYS[3]) + tonumber(state[2] or '0') >= total
    and redis.call('LLEN', KEYS[2]) == 0
    and tonumber(state[3] or '0') <= 0
end
-- No TTL while the run is active; `moved`: the script's own step happened (not a second
-- run), stamped as the run's last change. Adds 'ended' to `out` once the run has ended
-- (its books untouched: the caller gives them their TTL), or 'revived' when the books of
-- a run found abandoned move again (the caller puts it back among the active runs).
local function touch(out, moved)
  if moved then redis.call('HSET', KEYS[1], 'changed', tostring(now())) end
  if ended() then
    table.insert(out, 'ended')
    return out
  end
  if redis.call('TTL', KEYS[1]) > 0 then table.insert(out, 'revived') end
  for i = 1, #KEYS do redis.call('PERSIST', KEYS[i]) end
  return out
end
