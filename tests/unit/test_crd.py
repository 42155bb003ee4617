"""The committed CRD is exactly what the generator makes from the pydantic models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from poolbudget.api.crd import custom_resource_definition, render

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "poolbudget.dev_poolbudgets.yaml"


def test_committed_crd_is_up_to_date() -> None:
    assert CRD_FILE.read_text() == render(), "run `make crds` and commit crds/"


def test_the_charts_copy_is_byte_identical() -> None:
    chart_copy = CRD_FILE.parents[1] / "charts" / "poolbudget-operator" / "crds" / CRD_FILE.name
    assert chart_copy.read_bytes() == CRD_FILE.read_bytes(), "run `make crds`"


def _walk(schema: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, child in (schema.get("properties") or {}).items():
        found += _walk(child, f"{path}.{name}")
    if "items" in schema:
        found += _walk(schema["items"], f"{path}[]")
    return found


def test_every_spec_and_status_field_is_described() -> None:
    root = custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in ("spec", "status"):
        undocumented = [
            p for p, s in _walk(root["properties"][part], part) if not s.get("description")
        ]
        assert undocumented == []


def test_schema_carries_the_models_bounds_defaults_and_rules() -> None:
    spec = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"
    ]["spec"]
    target = spec["properties"]["targets"]["items"]
    assert target["required"] == ["deploymentName"]
    assert target["properties"]["processesPerPod"] == {
        **target["properties"]["processesPerPod"],
        "minimum": 1,
        "maximum": 1024,
        "default": 1,
    }
    assert spec["properties"]["reservedConnections"]["default"] == 10
    assert spec["properties"]["pooling"]["enum"] == ["Direct", "PgBouncerTransaction"]
    assert spec["properties"]["rollout"]["default"] == {}
    assert spec["properties"]["targets"]["x-kubernetes-list-map-keys"] == ["deploymentName"]
    rules = [r["rule"] for r in target["x-kubernetes-validations"]]
    assert rules == ["!has(self.maxPoolSize) || self.minPoolSize <= self.maxPoolSize"]
    assert (
        spec["properties"]["defaults"]["properties"]["poolTimeoutSeconds"]["exclusiveMinimum"]
        is True
    )


def test_names_and_printer_columns() -> None:
    crd = yaml.safe_load(CRD_FILE.read_text())
    assert crd["metadata"]["name"] == "poolbudgets.poolbudget.dev"
    assert crd["spec"]["names"]["shortNames"] == ["pbud"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Max", "Usable", "Peak", "Headroom", "Ready", "Age"]
