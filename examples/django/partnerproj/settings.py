"""Settings of an sFOX Connect partner's Django project that runs the sFOX token tasks.

Nothing secret lives here: the secret key, the database and Redis addresses come from
the environment, and the sFOX enterprise key is read by the package itself from
``SFOX_ENTERPRISE_API_KEY`` (or ``ENTERPRISE_API_KEY``) in the workers' environment.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


SECRET_KEY = os.environ["DJANGO_SECRET_KEY"]
DEBUG = env_flag("DJANGO_DEBUG")
ALLOWED_HOSTS = [h for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "").split(",") if h]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_celery_results",
    "django_celery_beat",
    "payments",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]

ROOT_URLCONF = "partnerproj.urls"
WSGI_APPLICATION = "partnerproj.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",  # psycopg 3
        "NAME": os.environ.get("PARTNER_DB_NAME", "partner"),
        "USER": os.environ.get("PARTNER_DB_USER", "partner"),
        "PASSWORD": os.environ.get("PARTNER_DB_PASSWORD", ""),
        "HOST": os.environ.get("PARTNER_DB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("PARTNER_DB_PORT", "5432"),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("DJANGO_LOG_LEVEL", "INFO")},
}

# -- Celery: every name below is read by partnerproj/celery.py through the CELERY namespace --

# The broker: this project's own Redis (a password goes in the URL:
# redis://:PASSWORD@host:6379/0; Celery masks it wherever it prints the URL).
CELERY_BROKER_URL = os.environ["PARTNER_REDIS_URL"]
# Results in this project's database (django-celery-results); the sFOX tasks keep their
# limiter and run books in Redis: SFOX_LIMITER_URL, else this broker.
CELERY_RESULT_BACKEND = "django-db"
# Store each task's name and arguments with its result (the admin shows them).
CELERY_RESULT_EXTENDED = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = "UTC"
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A test settings style: tasks run in the calling process (the sFOX tasks still need
# Redis for their limiter, and the enterprise key; see README.md).
CELERY_TASK_ALWAYS_EAGER = env_flag("PARTNER_CELERY_EAGER")
CELERY_TASK_EAGER_PROPAGATES = CELERY_TASK_ALWAYS_EAGER

# sFOX settings of the package, as this app's configuration (the package reads CELERY_SFOX_*
# here first, then SFOX_* in the environment, then its defaults). The enterprise key is
# not among them: it stays in the workers' environment (SFOX_ENTERPRISE_API_KEY).
CELERY_SFOX_API_URL = os.environ.get("PARTNER_SFOX_API_URL", "https://api.sfox.com")
CELERY_SFOX_TOKEN_BATCH_SIZE = int(os.environ.get("PARTNER_SFOX_BATCH_SIZE", "100"))
