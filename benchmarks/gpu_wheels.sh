#!/usr/bin/env bash
# Download the wheels that `pageant serve` and `pageant bench serve` need and the GPU machine's image
# lacks (it has torch, triton, transformers, pytest, httpx; no fastapi, uvicorn or pydantic), for
# Python 3.12 on x86-64 Linux, into an ignored folder that the device tool's `carry` ships:
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # default .whl/gpu_check (under .gitignore's /.whl/)
#
# Versions: those installed in this checkout's .venv (what the test suite runs with), else the pins
# below. --no-deps: the list is the whole closure (checked against each wheel's Requires-Dist by
# hand). All pure Python but pydantic-core (a manylinux wheel). xgrammar is left out: it has native
# code and the engine imports it only for structured outputs. benchmarks/gpu_check.sh installs
# only the wheels that are absent there or older (`gpu_check.py wheels DIR`). About 4 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.whl/gpu_check}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
PINS=(
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 click==8.5.1
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2
  anyio==4.16.0 sniffio==1.3.1 idna==3.20 prometheus-client==0.26.0
  httpx==0.28.1 httpcore==1.0.9 certifi==2026.10.19.post1
)
specs=()
for pin in "${PINS[@]}"; do
  name="${pin%%==*}"
  have="$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null || true)"
  specs+=("$name==${have:-${pin#*==}}")
done
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" "${specs[@]}"
ls "$DIR"
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
