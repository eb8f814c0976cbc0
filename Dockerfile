# One image for every stage, the gateway, the topic setup and the mail sink
# (docker-compose.yml picks the command). `smi stack up` needs none of this: it is for
# people who prefer Docker.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the package needs: no tests, no .git, no local state.
COPY pyproject.toml ./
COPY schemas ./schemas
COPY smi ./smi
COPY services ./services
RUN pip install . \
    && rm -rf /app/build /app/*.egg-info

# Non-root. The mount points exist in the image and belong to the app user, so the
# named volumes compose mounts there start out writable by it. /app itself is the
# user's too: Faust creates its data directory (`<app>-data`) in the working directory.
RUN groupadd --system --gid 10001 smi \
    && useradd --system --uid 10001 --gid smi --home-dir /app --shell /usr/sbin/nologin smi \
    && mkdir -p /data/storage /data/mail \
    && chown -R smi:smi /data \
    && chown smi:smi /app
USER smi

ENV STORAGE_DIR=/data/storage

CMD ["smi", "--help"]
