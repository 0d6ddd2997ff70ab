"""Offline validation of KServe manifests against the KServe Python SDK's models.

The SDK (``kserve``, with the ``kubernetes`` client it depends on) is generated from KServe's
OpenAPI description: each model class lists its fields (``openapi_types``: attribute -> type,
``attribute_map``: attribute -> JSON key), and its constructor refuses a missing required field.
``validate`` walks a manifest through those classes: an unknown key, a value of the wrong type
or a missing required field is an error with its path (``spec.predictor.model.runtime``).

It needs the SDK, which lives in its own venv (``.venv-kserve``, ``requirements-kserve.txt``):
its pins clash with TorchServe's. Imports here are the standard library, PyYAML and the SDK.
"""

from __future__ import annotations

import re
from typing import Any

# (apiVersion, kind) -> the SDK's model class
KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
# Kubernetes' resource.Quantity: "2", "4Gi", "500m" or a plain number
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i?|[mkMGTPE]|[un])?$")
# the SDKs write list[X] / dict(str, X) (KServe) and List[X] / Dict[str, X] (kubernetes 37)
_LIST = re.compile(r"^[lL]ist\[(.+)\]$")
_DICT = re.compile(r"^(?:dict\(str, (.+)\)|Dict\[str, (.+)\])$")


def _model_class(name: str):
    """The SDK class for a type name: KServe's models first, then the Kubernetes client's."""
    import kserve.models
    import kubernetes.client.models

    for module in (kserve.models, kubernetes.client.models):
        cls = getattr(module, name, None)
        if cls is not None and hasattr(cls, "openapi_types"):
            return cls
    return None


def _check(value: Any, type_name: str, path: str, errors: list[str]) -> None:
    """Appends to ``errors`` what is wrong with ``value`` as an instance of ``type_name``."""
    if value is None:
        return  # an explicit null: absent
    if m := _LIST.match(type_name):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list ({type_name}), got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _check(item, m.group(1), f"{path}[{i}]", errors)
        return
    if m := _DICT.match(type_name):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping ({type_name}), got {type(value).__name__}")
            return
        for key, item in value.items():
            _check(item, m.group(1) or m.group(2), f"{path}.{key}", errors)
        return
    simple = {"str": str, "bool": bool, "int": int, "float": (int, float), "datetime": str,
              "date": str}
    if type_name in simple:
        ok = isinstance(value, simple[type_name]) and not (
            type_name in ("int", "float") and isinstance(value, bool))
        if not ok:
            errors.append(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
        return
    if type_name == "object":
        return
    if type_name in ("ResourceQuantity", "IntOrString"):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            errors.append(f"{path}: expected a {type_name}, got {type(value).__name__}")
        elif type_name == "ResourceQuantity" and not QUANTITY.match(str(value)):
            errors.append(f"{path}: {value!r} is not a Kubernetes quantity")
        return
    cls = _model_class(type_name)
    if cls is None:
        errors.append(f"{path}: the SDK has no type {type_name}")
        return
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a mapping ({type_name}), got {type(value).__name__}")
        return
    by_key = {key: attr for attr, key in cls.attribute_map.items()}
    known = len(errors)
    for key, item in value.items():
        if key not in by_key:
            close = sorted(k for k in by_key if k.lower() == str(key).lower())
            hint = f" (did you mean {close[0]}?)" if close else ""
            errors.append(f"{path}.{key}: not a field of {type_name}{hint}")
            continue
        type_of = cls.openapi_types[by_key[key]]
        # Kubernetes' generated types say str for quantities and int-or-string ports
        if type_name == "V1ResourceRequirements" and key in ("limits", "requests"):
            type_of = "dict(str, ResourceQuantity)"
        elif key == "port" and type_name.endswith(("HTTPGetAction", "TCPSocketAction")):
            type_of = "IntOrString"
        _check(item, type_of, f"{path}.{key}", errors)
    if len(errors) > known:
        return  # the fields' own errors say it; their parents' constructors would repeat them
    # the constructor raises ValueError (pydantic's ValidationError for the Kubernetes client's
    # models) for a missing required field or a bad enum value
    try:
        cls(**{by_key[k]: v for k, v in value.items()})
    except (ValueError, TypeError) as exc:
        errors.append(f"{path}: {type_name}: " + "; ".join(str(exc).splitlines()[:3]))


def validate(doc: Any) -> list[str]:
    """Errors of one manifest (a parsed YAML document) against the SDK's models.

    Args:
        doc: the manifest as PyYAML loads it.

    Returns:
        Human-readable errors, each with the path of the offending field; empty when valid.
        A kind this project does not use (not in ``KINDS``) is itself an error.
    """
    if not isinstance(doc, dict):
        return [f"a manifest is a mapping, got {type(doc).__name__}"]
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in KINDS:
        return [f"apiVersion/kind {key[0]}/{key[1]} is not one of {sorted(KINDS)}"]
    errors: list[str] = []
    _check(doc, KINDS[key], doc.get("kind", "manifest"), errors)
    if not (doc.get("metadata") or {}).get("name"):
        errors.append(f"{doc['kind']}.metadata.name: missing")
    return errors


def check_pair(runtime: dict, isvc: dict) -> list[str]:
    """What KServe itself would refuse when it pairs an InferenceService with a ServingRuntime:
    the runtime named by the predictor's model, a model format and protocol the runtime lists,
    and a ``kserve-container`` with a port to route to.

    Args:
        runtime: a ServingRuntime manifest (``validate`` passed).
        isvc: an InferenceService manifest (``validate`` passed).

    Returns:
        Errors, empty when the pair fits.
    """
    errors = []
    spec, model = runtime["spec"], isvc["spec"]["predictor"]["model"]
    if model.get("runtime") != runtime["metadata"]["name"]:
        errors.append(f"InferenceService runtime {model.get('runtime')!r} is not the "
                      f"ServingRuntime {runtime['metadata']['name']!r}")
    fmt = model.get("modelFormat", {})
    formats = [(f["name"], f.get("version")) for f in spec.get("supportedModelFormats", [])]
    if not any(name == fmt.get("name") and (fmt.get("version") in (None, version))
               for name, version in formats):
        errors.append(f"model format {fmt} is not among the runtime's {formats}")
    protocol = model.get("protocolVersion", "v1")
    if protocol not in spec.get("protocolVersions", ["v1"]):
        errors.append(f"protocolVersion {protocol} is not among the runtime's "
                      f"{spec.get('protocolVersions')}")
    containers = {c["name"]: c for c in spec.get("containers", [])}
    if "kserve-container" not in containers:
        errors.append(f"no container named kserve-container in {sorted(containers)}")
    elif not containers["kserve-container"].get("ports"):
        errors.append("kserve-container has no port for KServe to route to")
    return errors
