"""Opt-ins (allow:): what is refused without them is covered by loader_cases/optins_refused.yaml (every route:
curated fields, xml:, xslt:); here: a plan names every opted-in resource in bold, and in its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
from rich.console import Console
from test_planfile import SCHEMA, case_plan, roundtrip

from vmform.plan import Plan
from vmform.planview import plan_lines, plan_markdown
from vmform.schema.kind import OPT_INS
from vmform.schema.optins import Scope

CASES = Path(__file__).parent / "diff_cases"


def test_opted_in_resource_is_bold_in_the_plan_and_in_its_json(tmp_path: Path) -> None:
    plan = case_plan(CASES / "domain_curated_fields_stopped.yaml", tmp_path)
    assert plan is not None and plan.changes
    assert plan.allowed == {"domain.web": ("host_devices", "host_paths")}
    data = plan.to_json()
    assert data["allowed"] == {"domain.web": ["host_devices", "host_paths"]}
    jsonschema.validate(data, SCHEMA)
    assert roundtrip(plan) == plan
    lines = plan_lines(plan)
    assert any(line.startswith("[bold]domain.web is allowed: host_devices, host_paths[/bold]") for line in lines)
    headline = next(line for line in lines if "# domain.web" in line)
    assert "[bold](allowed: host_devices, host_paths)[/bold]" in headline
    console = Console(record=True, force_terminal=True, width=200)
    for line in lines:
        console.print(line)
    assert "\x1b[1mdomain.web is allowed: host_devices, host_paths" in console.export_text(styles=True)
    markdown = plan_markdown(plan)
    assert "- **domain.web is allowed: host_devices, host_paths**" in markdown
    assert "**allowed: host_devices, host_paths**" in markdown


def test_no_changes_still_names_the_opt_ins() -> None:
    plan = Plan("p", "test:///default", (), (), {"domain.web": ("custom_emulator",)})
    assert any("[bold]domain.web is allowed: custom_emulator[/bold]" in line for line in plan_lines(plan))
    assert "**domain.web is allowed: custom_emulator**" in plan_markdown(plan)
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_plan_schema_knows_every_opt_in() -> None:
    assert SCHEMA["properties"]["allowed"]["additionalProperties"]["items"]["anyOf"][0]["enum"] == list(OPT_INS)


def test_scope_is_lexical_and_strict() -> None:
    scope = Scope(("/var/lib/vmform/lab",), frozenset())
    assert scope.inside("/var/lib/vmform/lab/a.qcow2") and scope.inside("/var/lib/vmform/lab/x/../b.raw")
    for path in ("/var/lib/vmform/lab", "/var/lib/vmform/lab/../etc/shadow", "/var/lib/vmform/labx/a", "srv/lab/a", "/srv", "/"):
        assert not scope.inside(path), path
