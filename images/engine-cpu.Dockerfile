# syntax=docker/dockerfile:1
# The Pageant engine on CPU: `pageant serve` on the CPU build of PyTorch, for trying the operator
# on a cluster without GPUs (kind, minikube; see README.md, "Trying it without a GPU"). It serves
# the demo model bundled in the package (an InferenceService with `model: {demo: {}}`), or any
# --model the operator passes, on CPU.
#
#   docker build -f images/engine-cpu.Dockerfile -t ghcr.io/pageant-project/pageant-engine-cpu:0.1.0 .
#
# torch comes from PyTorch's CPU wheel index first (no CUDA libraries: ~1 GB instead of ~6 GB); pip
# then keeps it when it installs `pageant[server]`, which accepts any torch>=2.4.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pageant/ pageant/
COPY engine/ engine/
COPY kernels/ kernels/
COPY operator/ operator/
RUN python -m pip wheel --no-deps --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG PAGEANT_VERSION=0.1.0
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
LABEL org.opencontainers.image.title="pageant-engine-cpu" \
      org.opencontainers.image.description="Pageant inference engine (pageant serve), CPU only" \
      org.opencontainers.image.source="https://github.com/pageant-project/pageant" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${PAGEANT_VERSION}"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/pageant/.cache/huggingface
COPY --from=build /wheels /wheels
# g++: the engine's CPU paged attention (kernels/cpu_attention.cpp) is compiled on the first start,
# for the CPU it runs on (about 10 s, into ~/.cache/torch_extensions); without a compiler the engine
# logs a warning and runs the slower PyTorch reference attention.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*
RUN python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && python -m pip install --no-cache-dir "/wheels/pageant-${PAGEANT_VERSION}-py3-none-any.whl[server]" \
    && rm -rf /wheels \
    && python -c "import torch, pageant.engine.demo as d; assert torch.version.cuda is None, 'a CUDA torch in the CPU image'; d.checkpoint_path()" \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/pageant --shell /usr/sbin/nologin pageant \
    && mkdir -p /home/pageant/.cache/huggingface \
    && chown -R 10001:10001 /home/pageant
USER 10001:10001
WORKDIR /home/pageant
EXPOSE 8000
# /health: liveness (the engine loop makes progress); /ready: readiness.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["pageant"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--device", "cpu"]
