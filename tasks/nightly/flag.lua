-- KEYS: meta. ARGV: field, value, ttl. A flag; until the orders are staged, or once the
-- run ended (its meta has a TTL), the meta keeps or gets `ttl`: no record of a run that
-- is not active lives without one.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('HEXISTS', KEYS[1], 'staged') == 0 or redis.call('TTL', KEYS[1]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return 1
