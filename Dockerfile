# One image for every service: worker, beat, flower and the dev sFOX stand-in.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY tasks ./tasks
RUN pip install '.[flower]' \
    && useradd --create-home --uid 10001 sfox

# Workers never need root; beat keeps its schedule file in the home directory.
USER sfox
WORKDIR /home/sfox

CMD ["celery", "-A", "tasks", "worker", "-l", "INFO"]
