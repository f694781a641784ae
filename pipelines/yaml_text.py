"""YAML as the project writes it for people and for kubectl: block style, multi-line strings as
literal blocks (the RayService's embedded Serve config), no anchors, keys in their given order."""

from __future__ import annotations

import yaml


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


_Dumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def to_yaml(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120)


def to_yaml_documents(docs: list[dict]) -> str:
    return "---\n".join(to_yaml(d) for d in docs)
