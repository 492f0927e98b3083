-- Run twice (a retry after a dropped connection), each script of the nightly run has the effect of
-- one run: HSETNX finds the order staged and changes nothing; a placement written again
-- is the same value; a lease taken again is found already ours.
--
-- KEYS: outcomes. ARGV: client_order_id, outcome json, 1 if it must win.
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
