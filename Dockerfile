# syntax=docker/dockerfile:1
# One image for the gateway (`butd serve` with REDIS_URL set) and the GPU worker (`butd worker`).
# Built and run by docker-compose.yml. Not built in this workplace (no registry access): see
# docs/service.md "Docker" for what was checked by reading.

ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# --- build: a virtual environment with the project and its pinned torch pair ---------------
FROM ${CUDA_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first (cached layer), then the source.
COPY pyproject.toml constraints.txt README.md ./
RUN python3.11 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['s3']))" > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt
COPY butd ./butd
COPY detector ./detector
COPY store ./store
COPY workers ./workers
COPY service ./service
COPY heads ./heads
RUN pip install -c constraints.txt --no-deps .

# --- runtime: the CUDA runtime, python3.11, the venv, a non-root user -----------------------
FROM ${CUDA_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent curl \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 \
 && apt-get purge -y software-properties-common gpg-agent && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 butd \
 && useradd --system --uid 10001 --gid butd --home-dir /home/butd --create-home butd \
 && mkdir -p /store && chown butd:butd /store
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BUTD_STORE_DIR=/store \
    BUTD_HOST=0.0.0.0 \
    BUTD_PORT=8000
USER butd
WORKDIR /home/butd
VOLUME ["/store"]
EXPOSE 8000
# Liveness of the gateway; the worker service overrides it (docker-compose.yml).
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${BUTD_PORT}/health/live" || exit 1
# Gateway by default (REDIS_URL must point at Redis); `butd worker` for a worker.
CMD ["butd", "serve"]
