# syntax=docker/dockerfile:1
# One image for every Engram process: memory shards, model worker, trainer (Ray head and
# workers run it too), the control-plane CLI. ENTRYPOINT is `engram`, so a container's
# command is an engram sub-command:  docker run engram:latest shard --shard-id 0 --port 50060
#
#   docker build -t engram:latest .                             # CPU torch (default)
#   docker build -t engram:cuda --build-arg TORCH_CUDA=cu128 .  # a CUDA build of torch
#
# Installs the project the way scripts/setup.sh does: torch first, pinned, from PyTorch's wheel
# index (a bare `torch` requirement would pull CUDA wheels onto a CPU image), then the locked
# dependencies with their hashes (requirements.lock, from scripts/lock.sh), then `pip install --no-deps .`.
#
# The base image by digest (the tag is for people; the digest is what is pulled): python:3.11-slim's
# multi-arch index when it was pinned (Python 3.11.16, Debian trixie). To move it: `docker buildx
# imagetools inspect python:3.11-slim` and replace tag and digest together.
FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

ARG TORCH_VERSION=2.13.0
# cpu, or a CUDA wheel index of download.pytorch.org/whl (cu126, cu128, ...); scripts/setup.sh uses the same
# CPU index (TORCH_INDEX_URL) for a development venv
ARG TORCH_CUDA=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# Dependencies change less often than code: install them from the lock alone first so a code
# edit does not re-download them. --require-hashes: every file is the one that was locked.
WORKDIR /src
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml ./
COPY engram/ engram/
COPY engram_cli/ engram_cli/
COPY proto/ proto/
COPY services/ services/
COPY worker/ worker/
COPY trainer/ trainer/
COPY benchmarks/ benchmarks/
RUN pip install --no-deps . && rm -rf /src

# Non-root; /data is the working directory (tokenizer cache, runs/, checkpoints volume), so
# the root filesystem can be mounted read-only.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/engram engram \
    && mkdir -p /data/checkpoints /data/runs /certs \
    && chown -R 10001:10001 /data /certs \
    && chmod 0700 /certs
USER 10001:10001
WORKDIR /data
VOLUME ["/data/checkpoints"]

# 50060 shard gRPC, 50051 model worker gRPC, 9464 Prometheus metrics (--metrics-port)
EXPOSE 50060 50062 50051 9464
# Healthy when the gRPC server on a default port (a shard on 50060, a model worker on 50051)
# answers SERVING (grpc.health.v1). Compose sets a health check per service (one-shot jobs
# disable it); Kubernetes ignores this and uses the manifests' gRPC probes.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
    CMD ["sh", "-c", "engram health --quiet --address 127.0.0.1:50060 || engram health --quiet --address 127.0.0.1:50051"]
ENTRYPOINT ["engram"]
CMD ["--help"]
