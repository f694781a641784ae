"""Rendered KubeRay objects against the KubeRay v1.7.0 CRD schemas in cluster/crds/, made strict
as `kubectl apply --validate=strict` is: a field the schema does not list is an error. `render`
refuses an object that fails (e.g. a misspelt key in `cluster.gpu.affinity`), naming the path;
tests/test_cluster_manifests.py checks every kind of every shipped definition with it.
"""

from __future__ import annotations

import copy
import gzip
from functools import lru_cache
from pathlib import Path

import yaml

CRDS = Path(__file__).resolve().parents[2] / "cluster" / "crds" / "kuberay-v1.7.0"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml.gz", "RayCluster": "ray.io_rayclusters.yaml.gz",
             "RayService": "ray.io_rayservices.yaml.gz", "RayCronJob": "ray.io_raycronjobs.yaml.gz"}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# What the API server checks on every object's metadata (ObjectMeta, the fields rendered here);
# a CRD's own schema says only `type: object`.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
    "name": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN},
    "namespace": {"type": "string", "maxLength": 63, "pattern": DNS_SUBDOMAIN},
    "labels": _STRING_MAP, "annotations": _STRING_MAP}}


def available() -> bool:
    """Whether the CRDs are here (a checkout; an installed package has no cluster/ folder)."""
    return all((CRDS / f).exists() for f in CRD_FILES.values())


def strict(schema):
    """Close every object schema that lists `properties` and says nothing about extras, as
    strict field validation does; `x-kubernetes-preserve-unknown-fields` stays open and an
    existing `additionalProperties` (a map's value schema) is kept and walked."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def crd_schema(kind: str, strict_fields: bool = True) -> dict:
    crd = yaml.load(gzip.decompress((CRDS / CRD_FILES[kind]).read_bytes()), Loader=_Loader)
    if crd["spec"]["names"]["kind"] != kind:
        raise ValueError(f"{CRD_FILES[kind]} defines {crd['spec']['names']['kind']}, not {kind}")
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(v1["schema"]["openAPIV3Schema"])
    schema["properties"].update(apiVersion={"const": "ray.io/v1"}, kind={"const": kind}, metadata=OBJECT_META)
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return strict(schema) if strict_fields else schema


def crd_errors(doc: dict, strict_fields: bool = True) -> list[str]:
    """`path: message` for each way `doc` (a ray.io object) breaks its CRD's schema."""
    import jsonschema

    validator = jsonschema.Draft7Validator(crd_schema(doc["kind"], strict_fields))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
