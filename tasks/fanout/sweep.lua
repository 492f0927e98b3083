-- ARGV: ttl, sender.
return stale(release(mine()), 100)
