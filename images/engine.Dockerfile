# syntax=docker/dockerfile:1
# The Pageant engine: `pageant serve` on a CUDA build of PyTorch. No model is baked in: the
# operator passes --model (a Hub id downloaded into HF_HOME, or a mounted PVC path).
#
#   docker build -f images/engine.Dockerfile -t ghcr.io/pageant-project/pageant-engine:0.1.0 .
#
# BASE_IMAGE must ship a CUDA build of torch that satisfies pyproject's range (torch>=2.4): pip
# keeps it and installs only what is missing, so the image never downloads a second torch.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pageant/ pageant/
COPY engine/ engine/
COPY kernels/ kernels/
COPY operator/ operator/
RUN python -m pip wheel --no-deps --no-cache-dir --wheel-dir /wheels .

FROM ${BASE_IMAGE}
ARG PAGEANT_VERSION=0.1.0
LABEL org.opencontainers.image.title="pageant-engine" \
      org.opencontainers.image.description="Pageant inference engine (pageant serve), CUDA" \
      org.opencontainers.image.source="https://github.com/pageant-project/pageant" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${PAGEANT_VERSION}"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/pageant/.cache/huggingface \
    TRITON_CACHE_DIR=/tmp/triton
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir "/wheels/pageant-${PAGEANT_VERSION}-py3-none-any.whl[server,kernels]" \
    && rm -rf /wheels \
    && python -c "import torch, pageant.engine; assert torch.version.cuda, 'BASE_IMAGE has a CPU-only torch'" \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/pageant --shell /usr/sbin/nologin pageant \
    && mkdir -p /home/pageant/.cache/huggingface \
    && chown -R 10001:10001 /home/pageant
USER 10001:10001
WORKDIR /home/pageant
EXPOSE 8000
# /health: liveness (the engine loop makes progress); /ready: readiness.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["pageant"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
