"""Variables (declaration, typing, precedence, sensitivity), sandboxed expressions, count and for_each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmform.errors import ManifestErrors
from vmform.manifest.loader import load_manifests
from vmform.manifest.variables import VariableInputs


def load(tmp_path: Path, text: str, settings: dict[str, Any] | None = None, inputs: VariableInputs | None = None) -> Any:
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    return load_manifests("unit", [path], tmp_path, settings or {}, inputs or VariableInputs(environ={}))


def errors(tmp_path: Path, text: str, **kwargs: Any) -> list[str]:
    with pytest.raises(ManifestErrors) as info:
        load(tmp_path, text, **kwargs)
    return [str(e) for e in info.value.errors]


DOMAIN = "variables:\n  size: {type: string, default: 64MiB}\ndomains:\n  web:\n    memory: \"{{ var.size }}\"\n"


def memory(manifests: Any, address: str = "domain.web") -> int:
    return int(manifests.resources[address].desired["memory"])


def test_precedence_toml_then_files_then_var_then_environment(tmp_path: Path) -> None:
    assert memory(load(tmp_path, DOMAIN)) == 64 * 1024**2
    settings = {"vars": {"size": "96MiB"}}
    assert memory(load(tmp_path, DOMAIN, settings)) == 96 * 1024**2
    var_file = tmp_path / "vars.yaml"
    var_file.write_text("size: 128MiB\n")
    files = VariableInputs([var_file], environ={})
    assert memory(load(tmp_path, DOMAIN, settings, files)) == 128 * 1024**2
    assigned = VariableInputs([var_file], ["size=160MiB"], environ={})
    assert memory(load(tmp_path, DOMAIN, settings, assigned)) == 160 * 1024**2
    environment = VariableInputs([var_file], ["size=160MiB"], environ={"VMFORM_VAR_size": "192MiB"})
    assert memory(load(tmp_path, DOMAIN, settings, environment)) == 192 * 1024**2


def test_declared_in_vmform_toml_and_typed_from_text(tmp_path: Path) -> None:
    text = "domains:\n  web:\n    vcpus: \"{{ var.cpus }}\"\n    max_vcpus: 8\n"
    settings = {"variables": {"cpus": {"type": "number", "default": 2}}}
    assert load(tmp_path, text, settings).resources["domain.web"].desired["vcpus"] == 2
    inputs = VariableInputs(assignments=["cpus=4"], environ={})
    assert load(tmp_path, text, settings, inputs).resources["domain.web"].desired["vcpus"] == 4


@pytest.mark.parametrize(("inputs", "message"), [
    (VariableInputs(assignments=["nope=1"], environ={}), "-var nope: no variable 'nope' is declared"),
    (VariableInputs(assignments=["cpus=many"], environ={}), "-var cpus: variable 'cpus' must be a number"),
    (VariableInputs(assignments=["size"], environ={}), "-var 'size': expected NAME=VALUE"),
])
def test_undeclared_and_ill_typed_values_name_their_source(tmp_path: Path, inputs: VariableInputs, message: str) -> None:
    found = errors(tmp_path, DOMAIN.replace("variables:\n", "variables:\n  cpus: {type: number, default: 1}\n"),
                   inputs=inputs)
    assert any(message in error for error in found), found


def test_ill_typed_file_value_and_missing_value(tmp_path: Path) -> None:
    var_file = tmp_path / "v.yaml"
    var_file.write_text("count: many\n")
    text = "variables:\n  count: {type: number}\ndomains:\n  web: {vcpus: \"{{ var.count }}\"}\n"
    found = errors(tmp_path, text, inputs=VariableInputs([var_file], environ={}))
    assert any(f"-var-file {var_file}: variable 'count' must be a number" in e for e in found), found
    found = errors(tmp_path, text)
    assert any("m.yaml:2:3: variable 'count' has no value" in e for e in found), found


def test_text_stays_text(tmp_path: Path) -> None:
    text = ("variables:\n  label: {type: string, default: '123'}\n"
            "domains:\n  web:\n    description: \"{{ var.label }}\"\n    vcpus: \"{{ 1 + 1 }}\"\n    max_vcpus: 2\n")
    desired = load(tmp_path, text).resources["domain.web"].desired
    assert (desired["description"], desired["vcpus"]) == ("123", 2)


@pytest.mark.parametrize(("template", "context", "expected"), [
    ("{{ x }}", {"x": "123"}, "123"),            # Jinja's native mode would parse these strings again
    ("{{ x }}", {"x": "0" * 64}, "0" * 64),      # (a sha256 of zeros became the number 0)
    ("{{ x }}", {"x": "[1, 2]"}, "[1, 2]"),
    ("{{ x }}", {"x": "None"}, "None"),
    ("{{ 1 + 2 }}", {}, 3),                      # constants keep their type like any lone expression
    ("{{ [1] }}", {}, [1]),
    ("{{ '7' }}", {}, "7"),
    ("a{{ 1 }}", {}, "a1"),
    ("{{ x }}{{ x }}", {"x": 1}, "11"),
])
def test_a_lone_expression_keeps_its_type_and_text_is_never_reparsed(template: str, context: dict[str, Any],
                                                                      expected: Any) -> None:
    from vmform.manifest.expressions import evaluate

    result = evaluate(template, context)
    assert (result, type(result)) == (expected, type(expected))


def test_sensitive_variables_only_reach_sensitive_fields(tmp_path: Path) -> None:
    text = ("variables:\n  token: {type: string, default: s3cret, sensitive: true}\n"
            "domains:\n  web:\n    description: \"{{ var.token }}\"\n")
    assert any("sensitive variable 'token' may only be used in sensitive fields" in e for e in errors(tmp_path, text))


@pytest.mark.parametrize("expression", [
    "{{ ''.__class__.__mro__ }}", "{{ lipsum.__globals__ }}", "{% include '/etc/passwd' %}",
    "{{ 'a' * 100000000 }}", "{{ range(10**9) | list }}", "{{ cycler.__init__.__globals__.os }}",
])
def test_the_sandbox_refuses_escapes(tmp_path: Path, expression: str) -> None:
    text = f"domains:\n  web:\n    description: \"{expression}\"\n"
    found = errors(tmp_path, text)
    assert len(found) == 1 and found[0].startswith("m.yaml:3:18: expression"), found
    assert expression in found[0] or repr(expression) in found[0]


def test_count_instances_addresses_and_names(tmp_path: Path) -> None:
    text = ("domains:\n  worker:\n    count: 3\n    vcpus: \"{{ 1 + index }}\"\n    max_vcpus: 4\n"
            "    description: \"worker {{ index }}\"\n")
    manifests = load(tmp_path, text)
    assert sorted(manifests.resources) == ["domain.worker[0]", "domain.worker[1]", "domain.worker[2]"]
    worker = manifests.resources["domain.worker[2]"]
    assert (worker.libvirt_name, worker.desired["vcpus"], worker.desired["description"]) == ("worker-2", 3, "worker 2")
    shrunk = load(tmp_path, text.replace("count: 3", "count: 1"))
    assert sorted(shrunk.resources) == ["domain.worker[0]"]  # shrinking drops the highest indices only


def test_for_each_map_is_stable_when_a_key_is_inserted(tmp_path: Path) -> None:
    text = ("networks:\n  lan:\n    for_each: {a: 10.9.1.1/24, c: 10.9.3.1/24}\n    ipv4: \"{{ each.value }}\"\n"
            "domains:\n  vm:\n    for_each: [a, c]\n    interfaces: ['lan[\"{{ each.key }}\"]']\n")
    before = load(tmp_path, text)
    after = load(tmp_path, text.replace("a: 10.9.1.1/24, c:", "a: 10.9.1.1/24, b: 10.9.2.1/24, c:").replace("[a, c]", "[a, b, c]"))
    added = set(after.resources) - set(before.resources)
    assert added == {'network.lan["b"]', 'domain.vm["b"]'}
    for address in before.resources:
        assert after.resources[address].desired == before.resources[address].desired
    assert after.resources['domain.vm["b"]'].desired["interfaces"][0]["network"] == "lan-b"


@pytest.mark.parametrize(("body", "message"), [
    ("count: 2\n    for_each: [a]", "takes count or for_each, not both"),
    ("count: -1", "count must be a whole number from 0 to 1000"),
    ("count: \"{{ var.nope }}\"", "expression error (no variable 'nope')"),
    ("for_each: [a, a]", "for_each over a list takes distinct strings"),
    ("for_each: {\"a b\": 1}", "for_each key 'a b' cannot be part of a libvirt name"),
])
def test_repetition_mistakes(tmp_path: Path, body: str, message: str) -> None:
    found = errors(tmp_path, f"domains:\n  web:\n    {body}\n")
    assert any(message in error for error in found), found


def test_expressions_read_other_resources_in_dependency_order(tmp_path: Path) -> None:
    text = ("domains:\n  vm:\n    description: \"on {{ volume.base.path }} ({{ network.lan.ipv4 }})\"\n"
            "    name: \"{{ volume.base.name }}-vm\"\n"
            "volumes:\n  base: {name: golden, pool: p, size: 16MiB}\n"
            "pools:\n  p: {path: /var/lib/vmform/p}\nnetworks:\n  lan: {ipv4: 10.77.0.1/24}\n")
    manifests = load(tmp_path, text)
    vm = manifests.resources["domain.vm"]
    assert vm.desired["description"] == "on /var/lib/vmform/p/golden (10.77.0.1/24)"
    assert vm.libvirt_name == "golden-vm"
    assert {address for address, _ in vm.references} == {"volume.base", "pool.p", "network.lan"}
    from vmform.graph import build_graph

    graph = build_graph(manifests)
    assert graph.has_edge("volume.base", "domain.vm") and graph.has_edge("network.lan", "domain.vm")


def test_expression_cycles_and_unknown_resources_are_errors(tmp_path: Path) -> None:
    cycle = ("volumes:\n  a: {pool: p, size: 16MiB, name: \"{{ volume.b.name }}\"}\n"
             "  b: {pool: p, size: 16MiB, name: \"{{ volume.a.name }}x\"}\npools:\n  p: {path: /var/lib/vmform/p}\n")
    found = errors(tmp_path, cycle)
    assert any("volume.a's values refer to volume.b, whose values refer back to it" in e for e in found), found
    unknown = "domains:\n  vm: {description: \"{{ network.nope.ipv4 }}\"}\n"
    found = errors(tmp_path, unknown)
    assert found == ["m.yaml:2:21: expression error (no such resource: 'nope'): '{{ network.nope.ipv4 }}'"], found


def test_outputs_are_declared_once_with_known_keys(tmp_path: Path) -> None:
    found = errors(tmp_path, "outputs:\n  a: {value: x, colour: red}\n  1b: x\n")
    assert any("output 'a': write {value, description, sensitive}" in e for e in found), found
    assert any("output name '1b' must be letters" in e for e in found), found
    manifests = load(tmp_path, "outputs:\n  ip: {value: \"{{ domain.vm.ip }}\", sensitive: true}\n  plain: text\n")
    assert manifests.outputs["ip"].sensitive and manifests.outputs["plain"].value == "text"
