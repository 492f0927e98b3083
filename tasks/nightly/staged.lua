-- KEYS: meta, orders, users, errors, then the run's other records. ARGV: orders staged.
-- The orders are staged: flag it, with the counts a later read checks the records
-- against (NightlyRun.lost): the orders read from the file, the users and skipped rows
-- found. From here on, while the run is active, no record carries a TTL (before, each
-- had one, bounding a run abandoned while staging). Run twice, the same.
redis.call('HSET', KEYS[1], 'staged', '1', 'staged_orders', ARGV[1],
  'staged_users', redis.call('LLEN', KEYS[3]), 'staged_errors', redis.call('HLEN', KEYS[4]))
for i = 1, #KEYS do redis.call('PERSIST', KEYS[i]) end
return 1
