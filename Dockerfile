# CPU image: vLLM for CPU, the converted SmolLM2 model, the server on port 8000.
FROM python:3.11-slim-bookworm

RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends make gcc g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY subjective ./subjective
# The same set-up `make serve` does on a fresh machine, baked into the image.
RUN make setup PYTHON=python3.11 models/SmolLM2-135M-Instruct/config.json \
    && rm -rf /root/.cache/pip /var/lib/apt/lists/*

EXPOSE 8000
CMD [".venv/bin/subjective", "serve", "--host", "0.0.0.0", "--port", "8000"]
