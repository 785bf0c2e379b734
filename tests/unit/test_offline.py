"""The offline commands — validate, schema, graph, fmt — with no libvirt connection at all (opening one
fails the test), and the manifest JSON Schema against every manifest the test suite knows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from test_diff import CASE_FILES

from vmform.cli import main
from vmform.manifest.fmt import format_text
from vmform.manifest.loader import load_manifests
from vmform.schema.jsonschema import manifest_schema
from vmform.schema.registry import KINDS

ROOT = Path(__file__).resolve().parents[2]
LOADER_CASES = sorted((ROOT / "tests" / "unit" / "loader_cases").glob("*.yaml"))
CLEAN_LOADER_CASES = [p for p in LOADER_CASES if "# ERROR:" not in p.read_text()]
EXAMPLES = [ROOT / "examples" / "quickstart" / "main.yaml", ROOT / "examples" / "gitops" / "main.yaml"]
SCHEMA_DOC = ROOT / "docs" / "manifest.schema.json"


@pytest.fixture(autouse=True)
def no_libvirt(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("an offline command opened a libvirt connection")

    monkeypatch.setattr("vmform.connection.open_connection", refuse)
    monkeypatch.setattr("vmform.api.ConnectionPool", refuse)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The gitops example, pointed at a host that does not exist."""
    shutil.copy(ROOT / "examples" / "gitops" / "main.yaml", tmp_path / "main.yaml")
    (tmp_path / "vmform.toml").write_text('[project]\nname = "offline"\nuri = "qemu+tcp://192.0.2.1/system"\n')
    return tmp_path


def vmform(project: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["-C", str(project), "--no-color", *args], catch_exceptions=False)


def test_validate_offline(project: Path) -> None:
    result = vmform(project, "validate")
    assert result.exit_code == 0, result.output
    assert "Valid: 4 resources in 1 files." in result.output
    (project / "main.yaml").write_text((project / "main.yaml").read_text().replace("network: gitops-net", "network: nope"))
    result = vmform(project, "validate")
    assert result.exit_code == 1
    assert "main.yaml:28:" in result.output and "refers to network 'nope'" in result.output


def test_validate_checks_rendered_xml_against_libvirt_rng(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmform.errors import VmformError

    calls: list[str] = []

    def fake_validate(kind: str, root: Any, address: str) -> None:
        calls.append(address)
        if kind == "domain":
            raise VmformError(f"{address}: the rendered XML does not validate")

    monkeypatch.setattr("vmform.render.validate.validate", fake_validate)
    result = vmform(project, "validate")
    assert result.exit_code == 1 and "domain.gitops-vm: the rendered XML does not validate" in result.output
    assert len(calls) == 4


def test_graph_dot_and_mermaid(project: Path) -> None:
    dot = vmform(project, "graph")
    assert dot.exit_code == 0
    assert '"volume.gitops-root" -> "domain.gitops-vm";' in dot.output
    assert dot.output.startswith('digraph "offline" {')
    mermaid = vmform(project, "graph", "--format", "mermaid")
    assert mermaid.output.splitlines()[0] == "flowchart LR"
    assert '  n2["volume.gitops-root"]' in mermaid.output and "  n2 --> n3" in mermaid.output


def test_schema_command_prints_the_generated_schema(project: Path) -> None:
    result = vmform(project, "schema")
    assert result.exit_code == 0
    assert json.loads(result.output) == manifest_schema()


def test_committed_schema_is_current() -> None:
    committed = json.loads(SCHEMA_DOC.read_text())
    assert committed == manifest_schema(), "docs/manifest.schema.json is stale: run vmform schema -o docs/manifest.schema.json"


def test_schema_is_generated_from_every_declared_field() -> None:
    schema = manifest_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for kind in KINDS.values():
        properties = schema["$defs"][kind.name]["properties"]
        for spec in kind.all_fields:
            assert spec.name in properties, f"{kind.name}.{spec.name}"
            assert properties[spec.name]["description"].startswith(spec.doc)
    type_schema = schema["$defs"]["domain"]["properties"]["type"]["anyOf"]
    assert type_schema[0]["enum"] == list(KINDS["domain"].spec("type").type.choices)
    assert type_schema[1]["pattern"]  # or an expression


@pytest.mark.parametrize("path", [*EXAMPLES, *CLEAN_LOADER_CASES], ids=lambda p: p.stem)
def test_schema_accepts_every_valid_manifest(path: Path) -> None:
    validator = jsonschema.Draft202012Validator(manifest_schema())
    for document in yaml.safe_load_all(path.read_text()):
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
        assert not errors, errors


def test_schema_accepts_every_diff_case_manifest() -> None:
    validator = jsonschema.Draft202012Validator(manifest_schema())
    for path in CASE_FILES:
        manifest = yaml.safe_load(path.read_text())["manifest"]
        errors = [f"{path.stem} {list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(yaml.safe_load(manifest))]
        assert not errors, errors


@pytest.mark.parametrize("text", [
    "domains:\n  web: {memroy: 1GiB}\n",
    "domains:\n  web: {type: kvn}\n",
    "domains:\n  web: {memory: lots}\n",
    "domains:\n  web: {interfaces: [{network: lan, mac: 52:54:00:12:34:56}]}\n",  # YAML reads a number
    "domain:\n  web: {}\n",
    "volumes:\n  v: {size: 1GiB}\n",
    "networks:\n  n: {ipv4: 10.0.0.1}\n",
])
def test_schema_rejects_mistakes(text: str) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load(text), manifest_schema())


FMT_SAMPLE = """\
# top comment
domains:
  web:   # the web server
    memory: 1GiB   # memory comment
    type: qemu
    interfaces: [{mac: "52:54:00:aa:00:01", network: lan}]
    disks:
    - bus: virtio     # after bus
      volume: root
    state: running
networks:
  lan: {bridge: vmfx0, mode: isolated}   # the lan
volumes:
  root: {size: 1GiB, pool: p}
pools:
  p: {path: /tmp/p}
"""

FMT_EXPECTED = """\
# top comment
networks:
  lan: {mode: isolated, bridge: vmfx0}   # the lan
pools:
  p: {path: /tmp/p}
volumes:
  root: {pool: p, size: 1GiB}
domains:
  web:   # the web server
    type: qemu
    memory: 1GiB   # memory comment
    disks:
      - volume: root
        bus: virtio   # after bus
    interfaces: [{network: lan, mac: "52:54:00:aa:00:01"}]
    state: running
"""


def test_fmt_layout_keeps_comments() -> None:
    assert format_text(FMT_SAMPLE) == FMT_EXPECTED
    assert format_text(FMT_EXPECTED) == FMT_EXPECTED


def _resources(path: Path) -> dict[str, Any]:
    manifests = load_manifests("fmt", [path], root=path.parent)
    return {address: (r.values, r.desired) for address, r in manifests.resources.items()}


@pytest.mark.parametrize("path", [*EXAMPLES, *CLEAN_LOADER_CASES], ids=lambda p: p.stem)
def test_fmt_never_changes_meaning_and_is_idempotent(path: Path, tmp_path: Path) -> None:
    text = path.read_text()
    formatted = format_text(text)
    assert format_text(formatted) == formatted
    before = tmp_path / "before" / path.name
    after = tmp_path / "after" / path.name
    for target, content in ((before, text), (after, formatted)):
        target.parent.mkdir()
        target.write_text(content)
        for image in path.parent.glob("*.img"):  # source images the case uploads
            shutil.copy(image, target.parent)
    try:
        expected = _resources(before)
    except Exception:  # noqa: BLE001 - a case that needs files around it: compare YAML data instead
        assert list(yaml.safe_load_all(formatted)) == list(yaml.safe_load_all(text))
        return
    assert _resources(after) == expected
    assert [c for c in text if c == "#"] == [c for c in formatted if c == "#"], "a comment was lost"


def test_fmt_check_lists_files_and_fmt_rewrites(project: Path) -> None:
    (project / "b.yaml").write_text(FMT_SAMPLE)
    check = vmform(project, "fmt", "--check")
    assert check.exit_code == 1
    assert check.output == "would reformat b.yaml\n"
    assert "main.yaml" not in check.output
    assert (project / "b.yaml").read_text() == FMT_SAMPLE, "--check changes nothing"
    done = vmform(project, "fmt")
    assert done.exit_code == 0 and (project / "b.yaml").read_text() == FMT_EXPECTED
    assert vmform(project, "fmt", "--check").exit_code == 0


def test_fmt_reports_yaml_errors_with_position(project: Path) -> None:
    (project / "b.yaml").write_text("networks: [\n")
    result = vmform(project, "fmt", "--check")
    assert result.exit_code == 1 and "b.yaml:2:1: cannot format" in result.output
