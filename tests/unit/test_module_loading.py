"""Modules: a directory of manifests used with inputs, its resources addressed module.NAME.kind.key, names
looked up in the module and then around it, outputs read by the project, count/for_each on modules."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from vmform.errors import ManifestErrors
from vmform.graph import build_graph
from vmform.manifest.loader import load_manifests
from vmform.manifest.variables import VariableInputs

REPO = Path(__file__).resolve().parents[2]

VM_MODULE = """
variables:
  name: {type: string}
  network: {type: string}
  memory: {type: any, default: 64MiB}
  secret: {type: any, default: null}
volumes:
  root: {pool: "{{ var.pool }}", format: qcow2, size: 1GiB}
domains:
  vm:
    name: "{{ var.name }}"
    memory: "{{ var.memory }}"
    disks: [{volume: root}]
    interfaces: [{network: "{{ var.network }}"}]
outputs:
  name: "{{ domain.vm.name }}"
  disk: "{{ volume.root.path }}"
"""


def project(tmp_path: Path, main: str, modules: dict[str, str] | None = None,
            inputs: VariableInputs | None = None) -> Any:
    for name, text in (modules or {}).items():
        directory = tmp_path / "modules" / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "main.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
    path = tmp_path / "project" / "main.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(main), encoding="utf-8")
    return load_manifests("unit", [path], path.parent, {}, inputs or VariableInputs(environ={}))


def errors(tmp_path: Path, main: str, modules: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ManifestErrors) as info:
        project(tmp_path, main, modules)
    return [str(e) for e in info.value.errors]


VM = VM_MODULE.replace("variables:\n", "variables:\n  pool: {type: string, default: images}\n")
BASE = """
pools:
  images: {type: dir, path: /var/lib/vmform/images}
networks:
  lab: {ipv4: 10.9.0.1/24}
"""


def test_module_resources_are_addressed_inside_it_and_named_apart(tmp_path: Path) -> None:
    manifests = project(tmp_path, BASE + """
modules:
  web: {source: ../modules/vm, inputs: {name: web, network: lab}}
  db: {source: ../modules/vm, inputs: {name: db, network: lab, memory: 128MiB}}
""", {"vm": VM})
    assert sorted(manifests.resources) == [
        "module.db.domain.vm", "module.db.volume.root",
        "module.web.domain.vm", "module.web.volume.root", "network.lab", "pool.images"]
    web, db = manifests.resources["module.web.domain.vm"], manifests.resources["module.db.domain.vm"]
    assert (web.libvirt_name, db.libvirt_name) == ("web", "db")
    # Resources without a name of their own get the module's name in front, so two uses never collide.
    assert manifests.resources["module.web.volume.root"].libvirt_name == "web-root"
    assert manifests.resources["module.db.volume.root"].libvirt_name == "db-root"
    # A name the module does not declare is the project's: pool images, network lab.
    assert web.desired["disks"][0] == {**web.desired["disks"][0], "pool": "images", "volume": "web-root"}
    assert web.desired["interfaces"][0]["network"] == "lab"
    assert db.desired["memory"] == 128 * 1024**2
    graph = build_graph(manifests)
    assert graph.has_edge("module.web.volume.root", "module.web.domain.vm")
    assert graph.has_edge("network.lab", "module.web.domain.vm")
    assert graph.has_edge("pool.images", "module.db.volume.root")
    assert not graph.has_edge("module.web.volume.root", "module.db.domain.vm")


def test_for_each_on_a_module_and_its_outputs(tmp_path: Path) -> None:
    main = BASE + """
variables:
  hosts: {type: map, default: {a: 64MiB, c: 96MiB}}
modules:
  worker:
    source: ../modules/vm
    for_each: "{{ var.hosts }}"
    inputs: {name: "w-{{ each.key }}", network: lab, memory: "{{ each.value }}"}
domains:
  probe:
    description: "{{ module.worker['a'].name }} {{ module.worker['c'].disk }} {{ module.worker | length }}"
"""
    manifests = project(tmp_path, main, {"vm": VM})
    assert manifests.resources['module.worker["a"].domain.vm'].libvirt_name == "w-a"
    assert manifests.resources['module.worker["c"].volume.root'].libvirt_name == "worker-c-root"
    probe = manifests.resources["domain.probe"]
    assert probe.desired["description"] == "w-a /var/lib/vmform/images/worker-c-root 2"
    # Reading a module's output is an edge from what the output read.
    graph = build_graph(manifests)
    assert graph.has_edge('module.worker["a"].domain.vm', "domain.probe")
    assert graph.has_edge('module.worker["c"].volume.root', "domain.probe")
    # Inserting a key in the middle of the map adds exactly that instance; the others keep their addresses.
    more = project(tmp_path, main, inputs=VariableInputs(assignments=["hosts={a: 64MiB, b: 80MiB, c: 96MiB}"],
                                                          environ={}))
    assert set(more.resources) - set(manifests.resources) == {'module.worker["b"].domain.vm',
                                                                'module.worker["b"].volume.root'}
    assert set(manifests.resources) <= set(more.resources)


def test_count_on_a_module(tmp_path: Path) -> None:
    manifests = project(tmp_path, BASE + """
modules:
  node:
    source: ../modules/vm
    count: 3
    inputs: {name: "node{{ index }}", network: lab}
""", {"vm": VM})
    assert [manifests.resources[f"module.node[{n}].domain.vm"].libvirt_name for n in range(3)] == \
        ["node0", "node1", "node2"]


def test_a_module_network_is_named_by_its_address(tmp_path: Path) -> None:
    net = """
variables:
  name: {type: string}
networks:
  net: {name: "{{ var.name }}", ipv4: 10.8.0.1/24}
outputs:
  network: "{{ network.net.address }}"
"""
    manifests = project(tmp_path, """
pools:
  images: {type: dir, path: /var/lib/vmform/images}
modules:
  lab: {source: ../modules/net, inputs: {name: lab8}}
  web: {source: ../modules/vm, inputs: {name: web, network: "{{ module.lab.network }}"}}
domains:
  other:
    interfaces: [{network: module.lab.network.net, ip: 10.8.0.20}]
""", {"vm": VM, "net": net})
    web = manifests.resources["module.web.domain.vm"]
    assert web.values["interfaces"][0]["network"] == "module.lab.network.net"
    assert web.desired["interfaces"][0]["network"] == "lab8"
    graph = build_graph(manifests)
    assert graph.has_edge("module.lab.network.net", "module.web.domain.vm")
    assert graph.has_edge("module.lab.network.net", "domain.other")
    hosts = manifests.resources["module.lab.network.net"].desired["dhcp_hosts"]
    assert [h["ip"] for h in hosts] == ["10.8.0.20"]


def test_nested_modules_and_module_depends_on(tmp_path: Path) -> None:
    pair = """
variables:
  prefix: {type: string}
modules:
  first: {source: ../vm, inputs: {name: "{{ var.prefix }}-1", network: lab}}
  second: {source: ../vm, inputs: {name: "{{ var.prefix }}-2", network: lab}, depends_on: [module.first]}
"""
    manifests = project(tmp_path, BASE + """
volumes:
  seed: {pool: images, format: raw, size: 1MiB}
modules:
  pair: {source: ../modules/pair, inputs: {prefix: p}, depends_on: [volume.seed]}
""", {"vm": VM, "pair": pair})
    address = "module.pair.module.second.domain.vm"
    assert manifests.resources[address].libvirt_name == "p-2"
    assert manifests.resources["module.pair.module.second.volume.root"].libvirt_name == "pair-second-root"
    graph = build_graph(manifests)
    assert graph.has_edge("module.pair.module.first.domain.vm", address)
    assert graph.has_edge("volume.seed", "module.pair.module.first.volume.root")


def test_sensitive_inputs_stay_sensitive_in_the_module(tmp_path: Path) -> None:
    main = BASE + """
variables:
  password: {type: string, default: hunter2, sensitive: true}
modules:
  web: {source: ../modules/vm, inputs: {name: web, network: lab, secret: "{{ var.password }}"}}
"""
    leaky = VM.replace("    memory: \"{{ var.memory }}\"\n", "    memory: \"{{ var.memory }}\"\n    description: \"{{ var.secret }}\"\n")
    found = errors(tmp_path, main, {"vm": leaky})
    assert any("sensitive variable 'secret' may only be used in sensitive fields" in e for e in found), found


@pytest.mark.parametrize(("entry", "message"), [
    ("web: {source: ../modules/vm, inputs: {name: web, network: lab, colour: red}}",
     "module ../modules/vm has no input 'colour'"),
    ("web: {source: ../modules/vm, inputs: {name: web, netwrk: lab}}", "did you mean 'network'"),
    ("web: {source: ../modules/vm, inputs: {network: lab}}", "module 'web' needs input 'name'"),
    ("web: {source: ../modules/vm, inputs: {name: [1], network: lab}}", "input 'name' must be a string"),
    ("web: {source: ../modules/nowhere}", "module source ../modules/nowhere is not a directory"),
    ("web: {source: 'https://example.com/m.git'}", "a module's source is a local directory"),
    ("web: {inputs: {}}", "module 'web' needs source"),
    ("web: {source: ../modules/vm, input: {}}", "unknown key 'input'; did you mean 'inputs'?"),
    ("web.x: {source: ../modules/vm}", "module name 'web.x' must be letters, digits, _ and -"),
    ("web: {source: ../modules/vm, inputs: {name: web, network: nowhere}}",
     "module.web.domain.vm refers to network 'nowhere', which is not declared"),
    ("web: {source: ../modules/vm, count: 1, for_each: [a], inputs: {name: web, network: lab}}",
     "web takes count or for_each, not both"),
    ("web: {source: ../modules/vm, depends_on: [volume.nope], inputs: {name: web, network: lab}}",
     "module.web: depends_on: no resource 'volume.nope'"),
])
def test_module_mistakes_are_one_line_each(tmp_path: Path, entry: str, message: str) -> None:
    found = errors(tmp_path, BASE + "modules:\n  " + entry + "\n", {"vm": VM})
    assert any(message in e for e in found), found
    assert all(e.startswith("main.yaml:") or e.startswith("../modules/") for e in found), found


def test_a_module_that_uses_itself_is_refused(tmp_path: Path) -> None:
    loop = "modules:\n  again: {source: ., inputs: {}}\n"
    found = errors(tmp_path, "modules:\n  first: {source: ../modules/loop}\n", {"loop": loop})
    assert any("which is already being loaded" in e for e in found), found


def test_errors_inside_a_module_point_at_the_module_file(tmp_path: Path) -> None:
    broken = VM.replace('memory: "{{ var.memory }}"', 'memory: "{{ var.memroy }}"')
    found = errors(tmp_path, BASE + "modules:\n  web: {source: ../modules/vm, inputs: {name: web, network: lab}}\n",
                   {"vm": broken})
    assert any(e.startswith("../modules/vm/main.yaml:") and "no variable 'memroy'" in e for e in found), found


def test_module_outputs_known_only_after_apply_fail_only_where_used(tmp_path: Path) -> None:
    module = VM + "  ips: \"{{ domain.vm.ips }}\"\n"
    manifests = project(tmp_path, BASE + """
modules:
  web: {source: ../modules/vm, inputs: {name: web, network: lab}}
domains:
  probe: {description: "{{ module.web.name }}"}
""", {"vm": module})
    assert manifests.resources["domain.probe"].desired["description"] == "web"
    found = errors(tmp_path, BASE + """
modules:
  web: {source: ../modules/vm, inputs: {name: web, network: lab}}
domains:
  probe: {description: "{{ module.web.ips }}"}
""", {"vm": module})
    assert any("output 'ips' of module.web" in e for e in found), found


def test_shipped_modules_load(tmp_path: Path) -> None:
    modules = (REPO / "modules").as_posix()
    manifests = project(tmp_path, f"""
pools:
  images: {{type: dir, path: /var/lib/vmform/images}}
volumes:
  base: {{pool: images, format: qcow2, size: 1GiB}}
modules:
  lab:
    source: {modules}/lab-network
    inputs: {{name: lab, ipv4: 10.7.0.1/24, dhcp: {{start: 10.7.0.100, end: 10.7.0.199}},
              dns_hosts: [{{ip: 10.7.0.1, hostnames: [gateway]}}]}}
  vm:
    source: {modules}/cloud-vm
    for_each: {{a: 10.7.0.10, b: 10.7.0.11}}
    inputs: {{name: "vm-{{{{ each.key }}}}", pool: images, base: base, network: "{{{{ module.lab.network }}}}",
              ip: "{{{{ each.value }}}}", hostname: "{{{{ each.key }}}}", groups: [workers]}}
""")
    network = manifests.resources["module.lab.network.net"].desired
    assert [h["ip"] for h in network["dhcp_hosts"]] == ["10.7.0.10", "10.7.0.11"]
    assert {"ip": "10.7.0.1", "hostnames": ["gateway"]} in network["dns_hosts"]
    vm = manifests.resources['module.vm["a"].domain.vm']
    assert vm.libvirt_name == "vm-a"
    assert vm.desired["disks"][0]["volume"] == "vm-a-root.qcow2"
    assert manifests.resources['module.vm["a"].volume.root'].desired["backing"]["volume"] == "base"
    assert manifests.resources['module.vm["b"].cloudinit.seed'].desired["meta_data"]["local-hostname"] == "b"


def test_a_saved_plan_goes_stale_when_a_module_file_changes(tmp_path: Path) -> None:
    from vmform import api, planfile
    from vmform.manifest.variables import VariableInputs as Inputs

    (tmp_path / "modules" / "vm").mkdir(parents=True)
    (tmp_path / "modules" / "vm" / "main.yaml").write_text(textwrap.dedent(VM))
    root = tmp_path / "project"
    root.mkdir()
    (root / "vmform.toml").write_text('[project]\nname = "unit"\nuri = "test:///default"\n')
    (root / "main.yaml").write_text(BASE + "modules:\n  web: {source: ../modules/vm, inputs: {name: web, network: lab}}\n")
    workspace = api.load_workspace(root, Inputs(environ={}))
    assert "../modules/vm/main.yaml" in workspace.manifests.files
    before = planfile.manifests_fingerprint(workspace.project, workspace.manifests)
    (tmp_path / "modules" / "vm" / "main.yaml").write_text(textwrap.dedent(VM).replace("64MiB", "96MiB"))
    after = planfile.manifests_fingerprint(workspace.project, workspace.manifests)
    assert before != after
