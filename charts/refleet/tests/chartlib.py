"""Shared helpers of the chart tests: paths, rendering with Helm's engine (helm_python),
the values documentation (values.yaml comments -> README table) and the copies the chart
keeps of files elsewhere in the repository (CRDs, alert rules, dashboards).

`python charts/refleet/tests/chartlib.py sync` rewrites every generated part (the copies and
the README's values table); the tests fail while any of them differs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1]
REPO = CHART.parents[1]
README = CHART / "README.md"
BIN = Path(os.environ.get("REFLEET_BIN", REPO / "target/debug/refleet"))
REFLECTOR_BIN = Path(os.environ.get("REFLEET_REFLECTOR_BIN", REPO / "target/debug/refleet-reflector"))
TABLE_START = "<!-- values-table:start (generated from values.yaml: scripts/test-chart sync) -->"
TABLE_END = "<!-- values-table:end -->"

# (repository source, chart copy): what the chart carries from elsewhere in the repository.
# A source that does not exist yet keeps the chart's placeholder (and is reported).
RULES_SOURCE = REPO / "dashboards/rules/refleet.rules.yaml"
RULES_COPY = CHART / "files/refleet.rules.yaml"
DASHBOARDS_SOURCE = REPO / "dashboards"
DASHBOARDS_COPY = CHART / "files/dashboards"
CRDS_SOURCE = REPO / "crds"
CRDS_COPY = CHART / "files/crds"


# ---------------------------------------------------------------- rendering


def load_chart():
    import helm_python

    return helm_python.Chart.load(str(CHART))


def render(values: dict[str, Any] | None = None, *, name: str = "rf", namespace: str = "refleet-system"):
    """Renders the chart like an install; returns (objects, notes), objects with `_source`."""
    files = load_chart().render(values or {}, name=name, namespace=namespace, is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["_source"] = path
                objects.append(doc)
    return objects, notes


def by_kind(objects, kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------- values documentation


def values_defaults() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def documented_paths(node: dict[str, Any] | None = None, prefix: str = "") -> list[tuple[str, dict[str, Any], bool]]:
    """Every value the docs describe, in values.yaml order, following the schema: an object
    with `properties` is a group (its keys are values too), anything else is one value.
    Returns (path, schema node, is_group)."""
    node = node if node is not None else schema()
    out = []
    for key, sub in node.get("properties", {}).items():
        if key == "global":
            continue
        path = f"{prefix}{key}"
        group = "properties" in sub
        out.append((path, sub, group))
        if group:
            out.extend(documented_paths(sub, path + "."))
    return out


KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_]+):(?:\s|$)")


def values_comments() -> dict[str, str]:
    """The comment block directly above each key of values.yaml, by dotted path."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = KEY_LINE.match(line)
        if not m:
            pending = []
            continue
        indent = len(m.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group("key")))
        path = ".".join(k for _, k in stack)
        if pending:
            comments[path] = " ".join(pending)
        pending = []
    return comments


def get_path(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        node = node[part]
    return node


def schema_type(node: dict[str, Any]) -> str:
    if "type" in node:
        return node["type"]
    if "oneOf" in node:
        return " or ".join(schema_type(n) for n in node["oneOf"])
    return "any"


def values_table() -> str:
    defaults = values_defaults()
    comments = values_comments()
    rows = ["| Value | Type | Default | Description |", "|---|---|---|---|"]
    for path, node, group in documented_paths():
        if group:
            continue
        default = json.dumps(get_path(defaults, path), separators=(", ", ": "), ensure_ascii=False)
        text = comments.get(path, "").replace("|", "\\|")
        rows.append(f"| `{path}` | {schema_type(node)} | `{default}` | {text} |")
    return "\n".join(rows)


def readme_with_table(readme: str) -> str:
    start, end = readme.index(TABLE_START), readme.index(TABLE_END)
    return readme[: start + len(TABLE_START)] + "\n" + values_table() + "\n" + readme[end:]


# ---------------------------------------------------------------- copies


def copy_pairs() -> list[tuple[Path, Path]]:
    """(source, copy) pairs that exist in the repository now."""
    pairs = [(p, CRDS_COPY / p.name) for p in sorted(CRDS_SOURCE.glob("*.yaml"))]
    if RULES_SOURCE.exists():
        pairs.append((RULES_SOURCE, RULES_COPY))
    pairs += [(p, DASHBOARDS_COPY / p.name) for p in dashboard_sources()]
    return pairs


def dashboard_sources() -> list[Path]:
    return sorted(DASHBOARDS_SOURCE.glob("*.json")) if DASHBOARDS_SOURCE.is_dir() else []


def stale_copies() -> list[Path]:
    """Copies the chart holds without a source: dashboards once dashboards/ has some."""
    stale = [p for p in sorted(CRDS_COPY.glob("*.yaml")) if not (CRDS_SOURCE / p.name).exists()]
    if dashboard_sources():
        names = {p.name for p in dashboard_sources()}
        stale += [p for p in sorted(DASHBOARDS_COPY.glob("*.json")) if p.name not in names]
    return stale


def sync() -> None:
    for source, copy in copy_pairs():
        copy.parent.mkdir(parents=True, exist_ok=True)
        if not copy.exists() or copy.read_bytes() != source.read_bytes():
            shutil.copyfile(source, copy)
            print(f"synced {copy.relative_to(REPO)} from {source.relative_to(REPO)}")
    for stale in stale_copies():
        stale.unlink()
        print(f"removed {stale.relative_to(REPO)} (no source)")
    readme = README.read_text()
    new = readme_with_table(readme)
    if new != readme:
        README.write_text(new)
        print(f"regenerated the values table of {README.relative_to(REPO)}")
    for what, path in (("alert rules", RULES_SOURCE), ("dashboards", DASHBOARDS_SOURCE)):
        if what == "dashboards" and not dashboard_sources() or what != "dashboards" and not path.exists():
            print(f"note: {path.relative_to(REPO)} does not exist yet: the chart keeps its placeholder {what}")


if __name__ == "__main__":
    if sys.argv[1:] != ["sync"]:
        sys.exit("usage: chartlib.py sync")
    sync()
