"""The Ansible module's own code, without Ansible running it: its argument_spec agrees with its DOCUMENTATION
(as ansible-test's validate-modules checks, here without any download), its doc blocks are YAML, and the diff it
returns shows field-level changes with sensitive values masked."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from vmform.plan import Action, Change, FieldChange, Plan
from vmform.schema.types import Effect

MODULE_PATH = Path(__file__).resolve().parents[2] / "ansible_collections/vmform/libvirt/plugins/modules/vmform.py"


@pytest.fixture(scope="module")
def module() -> ModuleType:
    # Not importable as "vmform": that name is the library it imports.
    spec = importlib.util.spec_from_file_location("vmform_ansible_module", MODULE_PATH)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    assert loaded.VMFORM_IMPORT_ERROR is None
    return loaded


def test_doc_blocks_are_yaml(module: ModuleType) -> None:
    documentation = yaml.safe_load(module.DOCUMENTATION)
    assert documentation["module"] == "vmform"
    assert isinstance(yaml.safe_load(module.EXAMPLES), list)
    returned = yaml.safe_load(module.RETURN)
    assert {"summary", "changes", "plan", "outputs", "apply", "errors"} <= set(returned)

    def strings(node: Any, where: str) -> None:
        # a description that YAML read as a mapping (an unquoted ": ") breaks ansible-doc
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "description":
                    items = value if isinstance(value, list) else [value]
                    assert all(isinstance(item, str) for item in items), f"{where}.{key}"
                elif key != "sample":
                    strings(value, f"{where}.{key}")
        elif isinstance(node, list):
            for item in node:
                strings(item, where)

    strings(documentation, "DOCUMENTATION")
    strings(returned, "RETURN")


def test_argument_spec_matches_documentation(module: ModuleType) -> None:
    options = yaml.safe_load(module.DOCUMENTATION)["options"]
    spec = module.ARGUMENT_SPEC
    assert set(options) == set(spec)
    for name, documented in options.items():
        argument = spec[name]
        for key in ("type", "choices", "elements"):
            assert documented.get(key) == argument.get(key), (name, key)
        assert documented.get("required", False) == argument.get("required", False), name
        assert documented.get("default") == argument.get("default"), name
    assert set(options) == {"project_src", "state", "targets", "variables", "parallelism", "uri", "lock_timeout",
                            "restart", "show_sensitive"}


def _plan() -> Plan:
    secret = "#cloud-config\npassword: hunter2\n"
    return Plan("lab", "qemu:///system", (
        Change("cloudinit.seed", "cloudinit", "seed", Action.CREATE,
               after={"pool": "lab", "user_data": secret, "meta_data": None}),
        Change("domain.web", "domain", "web", Action.UPDATE, before={"memory": 1}, after={"memory": 2},
               fields=(FieldChange("memory", 536870912, 1073741824, Effect.LIVE, "512MiB", "1GiB"),
                       FieldChange("autostart", None, True, Effect.LIVE, "", "true"))),
        Change("volume.old", "volume", "old", Action.DELETE, before={"pool": "lab", "size": 1024}),
    ))


def test_diff_is_field_level_and_masks_sensitive_values(module: ModuleType) -> None:
    plan_json = _plan().to_json()
    diffs = [module._diff(change) for change in plan_json["changes"]]
    create, update, delete = diffs
    assert create["before"] == "" and create["after_header"] == "cloudinit.seed (create)"
    assert "hunter2" not in create["after"] and "user_data: (sensitive, sha256:" in create["after"]
    assert "meta_data" not in create["after"]  # unset values are not shown
    assert update == {"before_header": "domain.web (on the host)", "after_header": "domain.web (update)",
                      "before": "memory: 512MiB\n", "after": "memory: 1GiB\nautostart: true\n"}
    assert yaml.safe_load(delete["before"]) == {"pool": "lab", "size": 1024} and delete["after"] == ""


def test_change_summary(module: ModuleType) -> None:
    summaries = [module._change_summary(change) for change in _plan().to_json()["changes"]]
    assert summaries[1] == {"address": "domain.web", "action": "update", "symbol": "~",
                            "fields": ["memory", "autostart"], "reason": ""}
    assert [(s["address"], s["action"]) for s in summaries] == [
        ("cloudinit.seed", "create"), ("domain.web", "update"), ("volume.old", "delete")]

