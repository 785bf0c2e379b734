"""Plans as data: every diff case's plan round-trips through JSON, validates against the shipped schema and
renders as markdown; plan files refuse what they must (format versions, damage, staleness)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from test_diff import CASE_FILES, PROJECT, live_object, load, read_case

from vmform import planfile
from vmform.diff import make_plan
from vmform.errors import PlanErrors
from vmform.graph import build_graph, creation_order
from vmform.live import LiveObject, LiveState
from vmform.ownership import Ledger
from vmform.plan import PLAN_FORMAT_VERSION, Action, Change, FieldChange, Plan
from vmform.planview import plan_markdown
from vmform.schema.types import Effect

SCHEMA = planfile.plan_json_schema()
CASES = [p for p in CASE_FILES if not read_case(p).data.get("expect_error") and not read_case(p).data.get("xfail")]


def case_plan(path: Path, tmp_path: Path) -> Plan | None:
    case = read_case(path)
    manifests = load(case.data["manifest"], tmp_path)
    resource = manifests.resources[case.data["address"]]
    live = LiveState("test:///default", [live_object(resource, case.data)], Ledger(PROJECT))
    graph = build_graph(manifests)
    try:
        return make_plan(manifests, graph, live, creation_order(graph))
    except PlanErrors:
        return None  # a refusal (prevent_destroy, data loss): no plan to save


def roundtrip(plan: Plan) -> Plan:
    return Plan.from_json(json.loads(json.dumps(plan.to_json(mask=False))))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_every_case_plan_roundtrips_validates_and_renders(path: Path, tmp_path: Path) -> None:
    plan = case_plan(path, tmp_path)
    if plan is None:
        pytest.skip("the case's plan is refused")
    assert roundtrip(plan) == plan
    jsonschema.validate(plan.to_json(), SCHEMA)
    markdown = plan_markdown(plan)
    assert markdown.count("<details>") == len(plan.changes)
    assert markdown.count("</details>") == len(plan.changes)


def every_action_plan() -> Plan:
    field = FieldChange("memory", 1024, 2048, Effect.LIVE, "1KiB", "2KiB")
    return Plan("p", "qemu:///system", (
        Change("network.n", "network", "n", Action.CREATE, after={"mode": "isolated", "dhcp_hosts": []}),
        Change("domain.d", "domain", "d", Action.UPDATE, before={"memory": 1024}, after={"memory": 2048},
               fields=(field,), depends_on=("network.n",), identity={"uuid": "u"}, restart=True),
        Change("volume.v", "volume", "v2", Action.DELETE_THEN_CREATE, before={"size": 1}, after={"size": 1},
               fields=(FieldChange("name", "v", "v2", Effect.REPLACE, '"v"', '"v2"'),), reason="name cannot change in place",
               live_name="v", identity={"pool": "p", "path": "/x/v"}),
        Change("volume.w", "volume", "w", Action.CREATE_THEN_DELETE, before={}, after={"size": 1},
               fields=(FieldChange("pool", "a", "b", Effect.REPLACE, "a", "b"),), reason="pool cannot change in place"),
        Change("network.old", "network", "old|pipe", Action.DELETE, before={"mode": "nat"}, replug=("d",)),
    ), notes=("a note",))


def test_every_action_roundtrips_and_validates() -> None:
    plan = every_action_plan()
    assert roundtrip(plan) == plan
    jsonschema.validate(plan.to_json(), SCHEMA)
    assert [c["symbol"] for c in plan.to_json()["changes"]] == ["+", "~", "-/+", "+/-", "-"]


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(format_version=2),
    lambda d: d["changes"][0].update(action="explode"),
    lambda d: d["changes"][1]["fields"][0].update(effect="sometimes"),
    lambda d: d["changes"][1].pop("fields"),
    lambda d: d.update(extra=1),
    lambda d: d["changes"][2].update(reason=""),
])
def test_schema_rejects_what_is_not_a_plan(mutate: Any) -> None:
    data = every_action_plan().to_json()
    mutate(data)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, SCHEMA)


def test_markdown_is_a_pull_request_comment() -> None:
    text = plan_markdown(every_action_plan())
    lines = text.splitlines()
    assert lines[0] == "### vmform plan for `p` on `qemu:///system`"
    assert "**Plan: 3 to add, 1 to change, 3 to destroy.**" in text
    assert "| `~` | `domain.d` | update in place | live, restarted by apply | memory |" in lines
    assert "| `-/+` | `volume.v` | replace | replace | name cannot change in place |" in lines
    assert "<details><summary><code>domain.d</code> update in place</summary>" in lines
    assert "    ~ memory = 1KiB -> 2KiB  (live)" in lines
    assert "- a note" in lines
    assert "[" not in "".join(line for line in lines if line.startswith("#")), "no rich markup left"
    empty = plan_markdown(Plan("p", "u", ()))
    assert "**No changes.**" in empty and "<details>" not in empty


def saved(tmp_path: Path, **fingerprints: Any) -> Path:
    prints = planfile.Fingerprints(fingerprints.get("manifests", "m"), fingerprints.get("live", {"domain.d": "x"}))
    path = tmp_path / "the.plan"
    planfile.write(path, planfile.SavedPlan(every_action_plan(), {"uri": "u", "hostname": "h", "uuid": "1"}, prints))
    return path


def test_plan_file_roundtrips(tmp_path: Path) -> None:
    path = saved(tmp_path)
    assert path.stat().st_mode & 0o077 == 0, "a plan file holds desired values: owner-only"
    back = planfile.read(path)
    assert back.plan == every_action_plan()
    assert back.host == {"uri": "u", "hostname": "h", "uuid": "1"}
    assert back.fingerprints == planfile.Fingerprints("m", {"domain.d": "x"}, None)
    data = json.loads(path.read_text())
    assert data["kind"] == "vmform-plan" and data["format_version"] == PLAN_FORMAT_VERSION
    assert "variables" in data["fingerprints"]
    assert back.describe().startswith("plan of project p for h (host UUID 1, u), made 20")


def test_a_damaged_plan_with_a_right_digest_is_still_refused(tmp_path: Path) -> None:
    document = {"kind": "vmform-plan", "format_version": PLAN_FORMAT_VERSION, "plan": {}}
    document["digest"] = planfile.content_digest(document)
    path = tmp_path / "x.plan"
    path.write_text(json.dumps(document))
    with pytest.raises(planfile.PlanFileError, match="is damaged"):
        planfile.read(path)


@pytest.mark.parametrize("edit", [
    lambda data: data["plan"]["changes"][0].update(name="other"),  # a hand edit
    lambda data: data["host"].update(uuid="2"),  # moved to another host's identity
    lambda data: data.update(project="q"),
])
def test_an_edited_plan_file_is_refused_before_anything_runs(tmp_path: Path, edit: Any) -> None:
    path = saved(tmp_path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(planfile.PlanFileError, match="was edited or damaged since vmform wrote it"):
        planfile.read(path)
    truncated = tmp_path / "cut.plan"
    truncated.write_text(saved(tmp_path).read_text()[:200])
    with pytest.raises(planfile.PlanFileError, match="not JSON"):
        planfile.read(truncated)


@pytest.mark.parametrize("content, message", [
    ("not json", "is not a vmform plan file (not JSON)"),
    ('{"kind": "other"}', "is not a vmform plan file"),
    ('{"kind": "vmform-plan"}', "plan file without a format version"),
    ('{"kind": "vmform-plan", "format_version": 99, "vmform_version": "9.0"}', "written by a newer vmform (9.0, plan format 99)"),
    ('{"kind": "vmform-plan", "format_version": 0}', "make the plan again with vmform plan -out"),
    ('{"kind": "vmform-plan", "format_version": 1, "plan": {}}', "carries no digest"),
    ('{"kind": "vmform-plan", "format_version": 1, "plan": {}, "digest": "sha256:00"}', "was edited or damaged"),
    ('{"kind": "vmform-plan", "format_version": 1, "plan": {}, '
     '"digest": "sha256:36c8e2a2ec2f7f0d1d0ba3dba4aeb1a0a7b4e8a7a0a44f1e8a6e20e1a0f1e8c0"}', "was edited or damaged"),
])
def test_unreadable_plan_files_say_why(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "x.plan"
    path.write_text(content)
    with pytest.raises(planfile.PlanFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        planfile.read(path)


def test_staleness_names_what_changed(tmp_path: Path) -> None:
    back = planfile.read(saved(tmp_path, live={"domain.a": "1", "domain.b": "2", "network.c": None}))
    planfile.check_fresh(back, "m", {"domain.a": "1", "domain.b": "2", "network.c": None})
    with pytest.raises(planfile.StalePlanError, match="^plan is stale: the manifests or vmform.toml changed"):
        planfile.check_fresh(back, "other", {"domain.a": "1", "domain.b": "2", "network.c": None})
    with pytest.raises(planfile.StalePlanError) as info:
        planfile.check_fresh(back, "m", {"domain.a": "1", "domain.b": "3", "network.c": "4"})
    assert str(info.value) == ("plan is stale: domain.b changed on the host, network.c appeared on the host since the "
                               "plan was made; make a new plan")
    with pytest.raises(planfile.StalePlanError, match="domain.a disappeared from the host"):
        planfile.check_fresh(back, "m", {"domain.a": None, "domain.b": "2", "network.c": None})
    with pytest.raises(planfile.StalePlanError, match="made for project p, not q"):
        planfile.check_project(back, "q")
    planfile.check_host(back, {"uri": "qemu+ssh://h/system", "hostname": "h", "uuid": "1"})  # another URI, same host
    with pytest.raises(planfile.StalePlanError, match="made for host h .host UUID 1, u., not for h2"):
        planfile.check_host(back, {"uri": "u", "hostname": "h2", "uuid": "2"})


def test_live_fingerprint_covers_running_state(tmp_path: Path) -> None:
    manifests = load("domains:\n  d: {type: qemu, memory: 64MiB}\n", tmp_path)
    running = LiveObject("domain", "d", {"memory": 1}, {"uuid": "u"}, address="domain.d", active=True,
                         running_values={"memory": 1})
    first = planfile.live_fingerprints(manifests, LiveState("u", [running], Ledger(PROJECT)))
    running.running_values["memory"] = 2
    second = planfile.live_fingerprints(manifests, LiveState("u", [running], Ledger(PROJECT)))
    assert first["domain.d"] and second["domain.d"] and first != second
    unmanaged = LiveObject("domain", "d", {}, {"uuid": "v"})
    assert planfile.live_fingerprints(manifests, LiveState("u", [unmanaged], Ledger(PROJECT)))["domain.d"]
    assert planfile.live_fingerprints(manifests, LiveState("u", [], Ledger(PROJECT))) == {"domain.d": None}
