-- KEYS: meta, orders, users, errors. The orders are staged: flag it, with the counts a
-- later read checks the books against (NightlyRun.lost). Run twice, the same counts.
redis.call('HSET', KEYS[1], 'staged', '1', 'staged_orders', redis.call('HLEN', KEYS[2]),
  'staged_users', redis.call('LLEN', KEYS[3]), 'staged_errors', redis.call('HLEN', KEYS[4]))
return 1
