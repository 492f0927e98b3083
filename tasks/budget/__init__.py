"""The request budget: the shared rate limiter, the retry policy and their Lua. No Celery here."""
