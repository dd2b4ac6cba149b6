"""Copy what the chart takes from the operator into the chart (Helm reads only files inside it).

- crds/pageant.dev_inferenceservices.yaml -> charts/pageant/files/crds/ (byte for byte)
- pageant.operator.rbac.RULES -> charts/pageant/files/rbac/operator-rules.yaml

Run ``python charts/pageant/tools/sync.py`` after changing the CRD or the operator's RBAC needs;
tests/chart fails while the copies differ. ``--check`` only reports drift (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "pageant"
CRD_NAME = "pageant.dev_inferenceservices.yaml"
CRD_SRC = ROOT / "crds" / CRD_NAME
CRD_DST = CHART / "files" / "crds" / CRD_NAME
RULES_DST = CHART / "files" / "rbac" / "operator-rules.yaml"
RULES_HEADER = """\
# The operator's PolicyRules: exactly the API groups, resources and verbs it uses (no wildcards,
# no Secrets). Generated from `pageant.operator.rbac.RULES` by tools/sync.py; a test fails when the
# two differ. Rules on cluster-scoped resources (customresourcedefinitions, namespaces) are granted
# only in all-namespaces mode; namespaced mode gets Roles in the watched namespaces only.
"""


def rules_yaml(rules: list[dict]) -> str:
    """The rules file's text: one flow-style list per field, in RULES' order."""
    import json

    lines = [RULES_HEADER.rstrip("\n")]
    for rule in rules:
        keys = [k for k in ("apiGroups", "resources", "resourceNames", "verbs") if k in rule]
        for i, key in enumerate(keys):
            lines.append(f"{'- ' if i == 0 else '  '}{key}: {json.dumps(list(rule[key]))}")
    return "\n".join(lines) + "\n"


def load_rules() -> list[dict] | None:
    sys.path.insert(0, str(ROOT))
    try:
        return list(importlib.import_module("pageant.operator.rbac").RULES)
    except ModuleNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift, change nothing")
    args = parser.parse_args(argv)
    wanted: dict[pathlib.Path, bytes] = {CRD_DST: CRD_SRC.read_bytes()}
    rules = load_rules()
    if rules is None:
        print("pageant.operator.rbac not found: rules file left as it is", file=sys.stderr)
    else:
        wanted[RULES_DST] = rules_yaml(rules).encode()
    drift = [p for p, data in wanted.items() if not p.exists() or p.read_bytes() != data]
    if args.check:
        for p in drift:
            print(f"out of date: {p.relative_to(ROOT)}", file=sys.stderr)
        return 1 if drift else 0
    for p in drift:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(wanted[p])
        print(f"updated {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
