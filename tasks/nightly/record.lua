-- Run twice (a retry after a dropped connection), each script of the nightly run has the effect of
-- one run: HSETNX finds the order staged and changes nothing; a placement written again
-- is the same value; a lease taken again is found already ours.
--
-- KEYS: outcomes, meta. ARGV: client_order_id, outcome json, 1 if it must win, ttl. The
-- meta's `recorded` counts the orders that have an outcome: fewer outcomes than that were
-- lost. An outcome of a run that is not active (its meta gone, or ended with a TTL) gets
-- the TTL: a late order task leaves nothing that lives forever.
local new
if ARGV[3] == '1' then
  new = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
else
  new = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
end
local active = redis.call('HEXISTS', KEYS[2], 'staged') == 1 and redis.call('TTL', KEYS[2]) == -1
if not active then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
elseif new == 1 then
  redis.call('HINCRBY', KEYS[2], 'recorded', 1)
end
return new
