-- KEYS: owner, lease, meta. ARGV: task id, lease token. The run failed before its orders
-- were staged: the date goes back to unclaimed, so that a trigger after the fix runs it.
-- A staged run stays owned (a later trigger resumes it). Run twice, nothing is left to drop.
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
if redis.call('HEXISTS', KEYS[3], 'staged') == 1 then return 0 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[3])
  return 1
end
return 0
