"""Strict field validation of an InferenceService file, as ``kubectl apply`` does by default.

The API server (``fieldValidation=Strict``, kubectl's default ``--validate=strict``) refuses an
object with a field its schema does not know, or a key set twice, instead of silently dropping it:
``replica: 3`` would otherwise render one replica. ``pageant operator render`` has no API server, so
this module applies the same check against the CRD's own openAPIV3Schema (:func:`schema.openapi_schema`,
the one the CRD is generated from) and reports each field by its path, like the API server:
``unknown field "spec.replica"``, ``unknown field "spec.adapters[0].nmae"``.

Pure Python (no jsonschema): the operator image installs only ``pageant[operator]``.
"""

from __future__ import annotations

from typing import Any

import yaml

from pageant.operator import schema

# metav1.ObjectMeta: the CRD schema says only `metadata: {type: object}`; the API server knows the rest.
OBJECT_META_FIELDS = frozenset({
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation", "creationTimestamp",
    "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations", "ownerReferences", "finalizers",
    "managedFields",
})


def unknown_fields(value: Any, node: dict[str, Any], path: str = "") -> list[str]:
    """The paths of the fields in ``value`` that the structural schema ``node`` does not define.

    Only unknown fields are looked for: values of the wrong type are skipped here (the spec parser
    reports those). ``x-kubernetes-preserve-unknown-fields`` subtrees accept anything, and maps
    (``additionalProperties``) accept any key."""
    out: list[str] = []
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return out
    if isinstance(value, dict) and node.get("type") == "object":
        props = node.get("properties")
        extra = node.get("additionalProperties")
        for key, sub_value in value.items():
            sub_path = f"{path}.{key}" if path else str(key)
            if props is not None and key in props:
                out += unknown_fields(sub_value, props[key], sub_path)
            elif isinstance(extra, dict):
                out += unknown_fields(sub_value, extra, sub_path)
            elif props is not None or extra is False:
                out.append(sub_path)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            out += unknown_fields(item, node["items"], f"{path}[{i}]")
    return out


def problems(body: dict[str, Any]) -> list[str]:
    """Every unknown field of an InferenceService, as the API server words it (empty: none)."""
    out = [f'unknown field "{p}"' for p in unknown_fields(body, schema.openapi_schema())]
    meta = body.get("metadata")
    if isinstance(meta, dict):
        out += [f'unknown field "metadata.{k}"' for k in meta if k not in OBJECT_META_FIELDS]
    return out


class _DuplicateKeys(yaml.SafeLoader):
    """A safe loader that records keys set twice in one mapping (which PyYAML keeps the last of)."""

    duplicates: list[str]

    def construct_mapping(self, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            try:
                key = self.construct_object(key_node, deep=True)
                hash(key)
            except (yaml.constructor.ConstructorError, TypeError):
                continue
            if key in seen:
                self.duplicates.append(f'line {key_node.start_mark.line + 1}: duplicate field "{key}"')
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_all(text: str) -> tuple[list[Any], list[str]]:
    """The YAML documents of ``text`` (empty ones dropped) and its duplicate keys, by line."""
    loader = _DuplicateKeys(text)
    loader.duplicates = []
    try:
        docs = []
        while loader.check_data():
            doc = loader.get_data()
            if doc is not None:
                docs.append(doc)
        return docs, loader.duplicates
    finally:
        loader.dispose()
