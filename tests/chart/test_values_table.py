"""The chart README's values table is generated from values.yaml (hack/chart-values-table.py)
and cannot drift from it; every value is documented and described by values.schema.json.
No cluster and no helm needed."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "poolbudget-operator"
SCRIPT = REPO / "hack" / "chart-values-table.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chart_values_table", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


table_script = _load_script()


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


def test_the_readme_table_is_the_one_values_yaml_gives() -> None:
    result = run_script("--check")
    assert result.returncode == 0, result.stderr


def test_every_value_is_in_the_readme_table() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in ("nameOverride", "fullnameOverride", "rbac.aggregateToDefaultRoles",
                "podDisruptionBudget.minAvailable", "topologySpreadConstraints", "resources"):  # fmt: skip
        assert f"| `{key}` |" in readme
    assert values["resources"]["limits"] == {"memory": "512Mi"}  # the table's default column
    assert (
        '`{"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}`' in readme
    )


def test_a_stale_readme_fails_the_check(tmp_path: Path) -> None:
    chart = tmp_path / "chart"
    chart.mkdir()
    shutil.copy(CHART / "values.yaml", chart / "values.yaml")
    readme = (CHART / "README.md").read_text()
    # The drift the issue found: two values missing from a hand-written table.
    stale = "".join(
        line
        for line in readme.splitlines(keepends=True)
        if not line.startswith(("| `nameOverride` |", "| `fullnameOverride` |"))
    )
    (chart / "README.md").write_text(stale)

    result = run_script("--check", "--chart", str(chart))
    assert result.returncode == 1
    assert "+| `nameOverride` |" in result.stderr
    assert "make chart-docs" in result.stderr

    assert run_script("--write", "--chart", str(chart)).returncode == 0
    assert (chart / "README.md").read_text() == readme


def test_parse_reads_helm_docs_comments() -> None:
    rows = table_script.parse(
        "# A header comment that documents nothing.\n"
        "\n"
        "image:\n"
        "  # -- The image,\n"
        "  # over two lines.\n"
        "  repository: example/op\n"
        "# -- Limits | requests, as one object.\n"
        "resources:\n"
        "  limits: {memory: 1Gi}\n"
        "  # a plain comment inside a documented mapping\n"
        "  requests:\n"
        "    cpu: 1\n"
        "pdb:\n"
        "  # -- (int or string) Unset by default.\n"
        "  maxUnavailable: null\n"
        "# -- Flags.\n"
        "args:\n"
        "  - --verbose\n"
    )
    assert [(r.key, r.type, r.default, r.description) for r in rows] == [
        ("image.repository", "string", "example/op", "The image, over two lines."),
        (
            "resources",
            "object",
            {"limits": {"memory": "1Gi"}, "requests": {"cpu": 1}},
            "Limits | requests, as one object.",
        ),
        ("pdb.maxUnavailable", "int or string", None, "Unset by default."),
        ("args", "list", ["--verbose"], "Flags."),
    ]
    rendered = table_script.table(rows)
    assert "| `resources` | object | `" in rendered
    assert "Limits \\| requests" in rendered  # a pipe would split the cell
    assert "| `pdb.maxUnavailable` | int or string | `null` |" in rendered


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ("a: 1\n", "undocumented values (add a `# --` comment): a"),
        (
            "# -- documented\na:\n  b: 1\nc:\n  d: {e: 1}\n",
            "undocumented values (add a `# --` comment): c.d.e",
        ),
        ("# -- not attached\n\na: 1\n", "undocumented values"),
        ("# -- nothing says what it is\na: null\n", "a defaults to null: name its type"),
        ("# --\na: 1\n", "a has an empty `# --` comment"),
    ],
)
def test_parse_refuses_what_the_table_could_not_show(values: str, error: str) -> None:
    with pytest.raises(table_script.ValuesDocError) as raised:
        table_script.parse(values)
    assert error in str(raised.value)


def _strict_objects(schema: dict[str, Any], path: str = "") -> list[str]:
    """Objects with named properties that would still take unknown keys."""
    loose = []
    if "properties" in schema and schema.get("additionalProperties") is not False:
        loose.append(path or "(top)")
    for key, sub in schema.get("properties", {}).items():
        loose += _strict_objects(sub, f"{path}.{key}".lstrip("."))
    items = schema.get("items")
    if isinstance(items, dict):
        loose += _strict_objects(items, f"{path}[]")
    return loose


def _mismatches(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Where values.yaml and the schema's named properties disagree, walking both."""
    properties = schema.get("properties")
    if properties is None or not isinstance(value, dict):
        return []  # a free-form object (resources, affinity...) or a leaf
    found = [f"{path}{k}: no schema entry" for k in value if k not in properties]
    found += [f"{path}{k}: no default in values.yaml" for k in properties if k not in value]
    for key in properties.keys() & value.keys():
        found += _mismatches(properties[key], value[key], f"{path}{key}.")
    return found


def test_every_value_is_in_the_schema_and_every_schema_key_has_a_default() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert _mismatches(schema, values) == []
    assert _strict_objects(schema) == [], "objects that take unknown keys"
