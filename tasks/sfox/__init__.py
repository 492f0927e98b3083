"""The sFOX side: the HTTP client and order placing. No Celery here."""
