# syntax=docker/dockerfile:1
# The Pageant operator: `pageant operator run` (kopf). Slim Python, `pageant[operator]`, no torch.
#
#   docker build -f images/operator.Dockerfile -t ghcr.io/pageant-project/pageant-operator:0.1.0 .
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
LABEL org.opencontainers.image.title="pageant-operator" \
      org.opencontainers.image.description="Pageant Kubernetes operator (pageant operator run)" \
      org.opencontainers.image.source="https://github.com/pageant-project/pageant" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${PAGEANT_VERSION}"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
# The operator must never pull torch: fail the build if anything did.
RUN python -m pip install --no-cache-dir "/wheels/pageant-${PAGEANT_VERSION}-py3-none-any.whl[operator]" \
    && rm -rf /wheels \
    && python -c "import importlib.util as u, pageant.operator.cli; assert u.find_spec('torch') is None, 'torch in the operator image'" \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pageant
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 8081
ENTRYPOINT ["pageant"]
CMD ["operator", "run"]
