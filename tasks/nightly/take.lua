-- KEYS: owner, lease, meta. ARGV: task id, lease token, lease milliseconds, owner ttl seconds
-- (until the orders are staged: staged.lua makes every record persistent).
-- Who runs the date now; returns {verdict, owner before the call ('' if none)}:
--   finished   the summary is written: nothing to do;
--   owner      the caller owns the run (first to claim it, or its own next turn) and holds
--              the lease for its token: free, already its token's, or kept for this task's
--              next turn (hand_over.lua);
--   took       the owner's coordinator is gone (no live lease: none renewed it for a whole
--              lease period): the caller owns the run now, and holds the lease;
--   busy       the caller owns the run, but another copy of the task holds the lease;
--   under_way  another task owns the run and holds a live lease.
-- Run twice (a retry after a dropped connection): the first run made the caller the owner
-- with this token, so the second answers 'owner' and changes nothing.
if redis.call('HEXISTS', KEYS[3], 'summary') == 1 then
  return {'finished', redis.call('GET', KEYS[1]) or ''}
end
local owner = redis.call('GET', KEYS[1]) or ''
local lease = redis.call('GET', KEYS[2])
if owner == ARGV[1] then
  if (not lease) or lease == ARGV[2] or lease == 'next:' .. ARGV[1] then
    redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
    return {'owner', owner}
  end
  return {'busy', owner}
end
if lease then return {'under_way', owner} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
if owner == '' then return {'owner', owner} end
return {'took', owner}
