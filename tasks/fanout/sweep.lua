-- ARGV: sender.
return stale(release(mine()), 100)
