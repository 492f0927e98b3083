# One image for every service: worker, beat, flower and the dev sFOX stand-in.
FROM python:3.11.10-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY tasks ./tasks
COPY examples ./examples
# Beat keeps its schedule in /var/lib/sfox-beat (a volume in docker-compose.yml); the
# directory exists, owned by the service user, so a fresh named volume inherits that owner.
RUN pip install . \
    && useradd --create-home --uid 10001 sfox \
    && install -d -o sfox -g sfox /var/lib/sfox-beat

# No service needs root.
USER sfox
# Run from the home directory, so nothing in /app shadows the installed package.
WORKDIR /home/sfox

CMD ["celery", "-A", "tasks", "worker", "-l", "INFO"]
