-- KEYS: lease. ARGV: token, task id, milliseconds. A turn ends: keep our lease for the
-- task's next turn (take.lua lets only that task have it) for one lease period. Run twice,
-- the lease is found kept already and stays so.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], 'next:' .. ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
