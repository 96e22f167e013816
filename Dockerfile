# syntax=docker/dockerfile:1
#
# dvs-agent container image. It is built by CI elsewhere (no Docker engine runs on the
# development machines); tests/test_packaging.py lints this file with hadolint, checks its
# structure with dockerfile-parse and installs the same wheel into a fresh venv.
#
#   docker build -t dvs-agent .
#
# The image holds no configuration and no secret. Mount the config read-only, give the token
# directory a volume that the consuming containers mount too, and pass the credentials from the
# environment (or as files: DVS_CLIENT_ID_FILE / DVS_CLIENT_SECRET_FILE with Docker secrets):
#
#   docker run -d --name dvs-agent \
#     -v ./agent.toml:/etc/dvs-agent/agent.toml:ro \
#     -v dvs-token:/run/dvs-agent \
#     -v dvs-state:/var/lib/dvs-agent \
#     -e DVS_CLIENT_ID -e DVS_CLIENT_SECRET \
#     dvs-agent
#
#   docker run --rm -v ./agent.toml:/etc/dvs-agent/agent.toml:ro dvs-agent check
#
# The agent runs as uid/gid 10001 (dvs). Consumers mount dvs-token (read-only) and read
# /run/dvs-agent/token as a member of gid 10001 (`--group-add 10001`) with the sink's default
# mode 0640. The config's sink paths belong under /run/dvs-agent and state_dir is
# /var/lib/dvs-agent (config/agent.example.toml's defaults). The HEALTHCHECK asks the agent's
# health listener on 127.0.0.1:8787 (health.listen), so keep it on that address.
#
# Both stages use the same base image: the venv built in the first is copied into the second
# at the same path, and its interpreter links to the base image's /usr/local/bin/python3.11.
# CI may pin the base image by digest as well (python:3.11-slim-bookworm@sha256:...).

FROM python:3.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
# agent/examples/ links to the example files in config/, which the wheel carries (the only
# part of config/ it takes)
COPY config ./config
COPY agent ./agent

# The project's wheel and a wheel of every runtime dependency (all of them publish binary
# wheels, so no compiler is needed), then a venv without pip holding only those wheels.
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip wheel --wheel-dir /wheels /wheels/dvs_agent-*.whl \
    && python -m venv --without-pip /opt/dvs-agent \
    && pip --python /opt/dvs-agent/bin/python install --no-index --find-links /wheels \
        /wheels/dvs_agent-*.whl \
    && /opt/dvs-agent/bin/dvs-agent --version


FROM python:3.11-slim-bookworm

# CI passes the repository's address: --build-arg SOURCE_URL=https://...
ARG SOURCE_URL=https://github.com/osigu/dvs-agent

LABEL org.opencontainers.image.title="dvs-agent" \
      org.opencontainers.image.description="Keeps a fresh OSIGU/DVS OAuth2 access token on disk for the services next to it" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/dvs-agent/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVS_AGENT_CONFIG=/etc/dvs-agent/agent.toml

# A fixed uid/gid, so that volumes and consumers' --group-add stay stable across rebuilds.
RUN groupadd --system --gid 10001 dvs \
    && useradd --system --uid 10001 --gid dvs --no-create-home \
        --home-dir /var/lib/dvs-agent --shell /usr/sbin/nologin dvs \
    && install -d -o dvs -g dvs -m 0750 /etc/dvs-agent /run/dvs-agent \
    && install -d -o dvs -g dvs -m 0700 /var/lib/dvs-agent

COPY --from=builder /opt/dvs-agent /opt/dvs-agent

VOLUME ["/etc/dvs-agent", "/run/dvs-agent", "/var/lib/dvs-agent"]

WORKDIR /var/lib/dvs-agent
USER 10001:10001

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8787/healthz', timeout=3).status == 200 else 1)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["dvs-agent"]
CMD ["run"]
