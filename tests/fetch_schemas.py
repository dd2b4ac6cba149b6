"""Download the upstream schemas the tests validate against, pinned to the commits they were copied from.

The chart and operator tests validate rendered KEDA, Prometheus Operator, Gateway API, LeaderWorkerSet
and inference-extension objects against those projects' published CRDs, and the server tests check
responses against OpenAI's API document. They look for the files in $PAGEANT_SCHEMAS_DIR (default:
../shared/schemas beside the checkout). Outside the environment that provides that folder:

    python tests/fetch_schemas.py DIR          # download every file into DIR
    PAGEANT_SCHEMAS_DIR=DIR bash tests/run
    python tests/fetch_schemas.py --list       # the pinned table, downloading nothing

Each file comes from raw.githubusercontent.com at its pinned commit, byte for byte; the only check is
that it is non-empty YAML. Standard library only (PyYAML, when installed, parses each file).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import urllib.request

# file name -> (GitHub owner/repo, path in that repository, commit it was copied from)
SCHEMAS: dict[str, tuple[str, str, str]] = {
    "keda.sh_scaledobjects.yaml": (
        "kedacore/keda", "config/crd/bases/keda.sh_scaledobjects.yaml", "8b4f083ca8c8c2baf8477e322bd4d16ac4dfa09a"),
    "keda.sh_triggerauthentications.yaml": (
        "kedacore/keda", "config/crd/bases/keda.sh_triggerauthentications.yaml",
        "8b4f083ca8c8c2baf8477e322bd4d16ac4dfa09a"),
    "monitoring.coreos.com_servicemonitors.yaml": (
        "prometheus-operator/prometheus-operator", "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
        "6adcebc5076c34f4f55f8f5f7b1e528929373ac7"),
    "monitoring.coreos.com_podmonitors.yaml": (
        "prometheus-operator/prometheus-operator", "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml",
        "6adcebc5076c34f4f55f8f5f7b1e528929373ac7"),
    "monitoring.coreos.com_prometheusrules.yaml": (
        "prometheus-operator/prometheus-operator", "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml",
        "6adcebc5076c34f4f55f8f5f7b1e528929373ac7"),
    "inference.networking.k8s.io_inferencepools.yaml": (
        "kubernetes-sigs/gateway-api-inference-extension", "config/crd/bases/inference.networking.k8s.io_inferencepools.yaml",
        "84436a96b9e6ce2b59ddacd3d04c31b4fbd442de"),
    "leaderworkerset.x-k8s.io_leaderworkersets.yaml": (
        "kubernetes-sigs/lws", "config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml",
        "060ab4da17eea1f0865fcbd3236bb1075e2cea32"),
    "http.keda.sh_httpscaledobjects.yaml": (
        "kedacore/http-add-on", "config/crd/bases/http.keda.sh_httpscaledobjects.yaml",
        "59b2f6a115ad735a108d830f4d525f8462497c7d"),
    "http.keda.sh_interceptorroutes.yaml": (
        "kedacore/http-add-on", "config/crd/bases/http.keda.sh_interceptorroutes.yaml",
        "59b2f6a115ad735a108d830f4d525f8462497c7d"),
    "gateway.networking.k8s.io_httproutes.yaml": (
        "kubernetes-sigs/gateway-api", "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml",
        "4564255ac2c35d582249b3cdf261bdf51c8bca32"),
    "openai-openapi.yaml": (
        "openai/openai-openapi", "openapi.yaml", "f85dbe223d40e1a31cba812ab2d755c7e98a92a3"),
}


def url(name: str) -> str:
    """Where ``name`` is downloaded from: the raw file at its pinned commit."""
    repo, path, commit = SCHEMAS[name]
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


def table() -> str:
    """One line per file: name, owner/repo, commit, path in the repository."""
    width = max(map(len, SCHEMAS))
    repo_width = max(len(repo) for repo, _, _ in SCHEMAS.values())
    return "\n".join(f"{name:<{width}}  {repo:<{repo_width}}  {commit}  {path}"
                     for name, (repo, path, commit) in SCHEMAS.items())


def check_yaml(name: str, data: bytes) -> None:
    """Raise ValueError unless ``data`` is non-empty YAML (parsed when PyYAML is installed)."""
    if not data.strip():
        raise ValueError(f"{name}: empty download")
    try:
        import yaml
    except ImportError:  # no parser: at least refuse an HTML error page
        if data.lstrip()[:1] == b"<":
            raise ValueError(f"{name}: not YAML (starts with '<')") from None
        return
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        docs = [d for d in yaml.load_all(data, Loader=loader) if d is not None]
    except yaml.YAMLError as exc:
        raise ValueError(f"{name}: not YAML: {exc}") from exc
    if not docs or not all(isinstance(d, dict) for d in docs):
        raise ValueError(f"{name}: not a YAML mapping")


def fetch(name: str, folder: pathlib.Path, timeout: float = 120) -> pathlib.Path:
    with urllib.request.urlopen(url(name), timeout=timeout) as response:
        data = response.read()
    check_yaml(name, data)
    target = folder / name
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=pathlib.Path, help="where to write the files (created if needed)")
    parser.add_argument("--list", action="store_true", help="print the pinned table and download nothing")
    args = parser.parse_args(argv)
    if args.list:
        print(table())
        return 0
    if args.folder is None:
        parser.error("give the target folder (or --list)")
    args.folder.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in SCHEMAS:
        try:
            path = fetch(name, args.folder)
        except (OSError, ValueError) as exc:
            print(f"FAILED {name} from {url(name)}: {exc}", file=sys.stderr)
            failed += 1
        else:
            print(f"{path} ({path.stat().st_size} bytes)")
    if failed:
        print(f"{failed} of {len(SCHEMAS)} downloads failed", file=sys.stderr)
        return 1
    print(f"now: PAGEANT_SCHEMAS_DIR={args.folder.resolve()} bash tests/run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
