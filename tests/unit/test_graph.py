"""The dependency graph: edges from references and depends_on, creation order, cycles."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from vmform.errors import ManifestError, ManifestErrors
from vmform.graph import build_graph, creation_order
from vmform.model import Manifests

Load = Callable[..., Manifests]

STACK = """\
networks:
  lan: {}
pools:
  lab: {path: /var/lib/vmform/lab}
volumes:
  base: {pool: lab, size: 10GiB}
  web-root: {pool: lab, backing: base}
domains:
  app:
    depends_on: [domain.zdb]
  web:
    disks: [web-root]
    interfaces: [lan]
  zdb: {}
"""


def order(load_files: Load, text: str) -> list[str]:
    return creation_order(build_graph(load_files({"stack.yaml": text})))


def before(sequence: list[str], first: str, then: str) -> bool:
    return sequence.index(first) < sequence.index(then)


def test_creation_order_follows_references_and_depends_on(load_files: Load) -> None:
    sequence = order(load_files, STACK)
    assert sorted(sequence) == sorted(
        [
            "network.lan",
            "pool.lab",
            "volume.base",
            "volume.web-root",
            "domain.app",
            "domain.web",
            "domain.zdb",
        ]
    )
    # Names are chosen so that plain alphabetical order would get each of these wrong.
    assert before(sequence, "pool.lab", "volume.base")
    assert before(sequence, "volume.base", "volume.web-root")  # backing first
    assert before(sequence, "volume.web-root", "domain.web")
    assert before(sequence, "pool.lab", "domain.web")
    assert before(sequence, "network.lan", "domain.web")
    assert before(sequence, "domain.zdb", "domain.app")  # depends_on


def test_creation_order_is_deterministic(load_files: Load) -> None:
    assert order(load_files, STACK) == order(load_files, STACK)


def test_graph_edges_record_where_they_come_from(load_files: Load) -> None:
    graph = build_graph(load_files({"stack.yaml": STACK}))
    assert graph.edges["volume.web-root", "domain.web"]["via"] == ("disks", 0, "volume")
    assert graph.edges["network.lan", "domain.web"]["via"] == ("interfaces", 0, "network")
    assert graph.edges["pool.lab", "volume.base"]["via"] == ("pool",)
    assert graph.edges["volume.base", "volume.web-root"]["via"] == ("backing",)
    assert graph.edges["domain.zdb", "domain.app"]["via"] == ("depends_on", 0)
    assert not graph.has_edge("domain.web", "volume.web-root")
    assert graph.number_of_edges() == 6


def test_independent_resources_have_no_edges(load_files: Load) -> None:
    graph = build_graph(load_files({"s.yaml": "domains:\n  a: {}\n  b: {}\nnetworks:\n  lan: {}\n"}))
    assert sorted(graph.nodes) == ["domain.a", "domain.b", "network.lan"]
    assert graph.number_of_edges() == 0


def test_bridge_interface_is_not_a_reference(load_files: Load) -> None:
    graph = build_graph(
        load_files({"s.yaml": "networks:\n  br0: {}\ndomains:\n  web: {interfaces: [{bridge: br0}]}\n"})
    )
    assert graph.number_of_edges() == 0


def test_renamed_resources_still_order_by_address(load_files: Load) -> None:
    text = "pools:\n  lab: {path: /var/lib/vmform/lab, name: aaa}\nvolumes:\n  v: {pool: lab, size: 1GiB, name: zzz}\n"
    assert order(load_files, text) == ["pool.lab", "volume.v"]


def cycle_error(load_files: Load, files: dict[str, str]) -> ManifestError:
    manifests = load_files(files)  # the manifests themselves are valid: only the graph has a cycle
    with pytest.raises(ManifestErrors) as info:
        build_graph(manifests)
    assert isinstance(info.value, ManifestErrors)
    assert len(info.value.errors) == 1
    error = info.value.errors[0]
    assert isinstance(error, ManifestError)
    assert error.position is not None
    assert str(error.position) in str(info.value)
    return error


def chain(error: ManifestError) -> list[str]:
    match = re.fullmatch(r"dependency cycle: (.+)", error.message)
    assert match, error.message
    members = match.group(1).split(" -> ")
    assert members[0] == members[-1], f"cycle text does not close: {error.message}"
    return members


def rotations(*members: str) -> set[str]:
    """Every way of writing the cycle members[0] -> ... -> members[0], whatever node it starts at."""
    result = set()
    for start in range(len(members)):
        turned = [*members[start:], *members[:start]]
        result.add("dependency cycle: " + " -> ".join([*turned, turned[0]]))
    return result


def test_depends_on_cycle(load_files: Load) -> None:
    text = "domains:\n  a:\n    depends_on: [domain.b]\n  b:\n    depends_on: [domain.a]\n"
    error = cycle_error(load_files, {"cycle.yaml": text})
    assert error.message in rotations("domain.a", "domain.b")
    assert len(chain(error)) == 3
    assert error.position is not None
    assert Path(error.position.file).name == "cycle.yaml"
    assert error.position.line in (3, 5)  # one of the depends_on entries that closes the cycle
    assert error.position.column == 18


def test_self_dependency_is_a_cycle(load_files: Load) -> None:
    error = cycle_error(
        load_files, {"self.yaml": "domains:\n  a:\n    vcpus: 1\n    depends_on: [domain.a]\n"}
    )
    assert error.message == "dependency cycle: domain.a -> domain.a"
    assert error.position is not None and error.position.line == 4


def test_three_step_cycle_across_kinds_and_files(load_files: Load) -> None:
    files = {
        "storage.yaml": "pools:\n  lab: {path: /var/lib/vmform/lab}\nvolumes:\n  disk: {pool: lab, size: 1GiB, depends_on: [domain.web]}\n",
        "net.yaml": "networks:\n  lan: {depends_on: [volume.disk]}\n",
        "vms.yaml": "domains:\n  web:\n    interfaces: [lan]\n",
    }
    error = cycle_error(load_files, files)
    assert error.message in rotations("volume.disk", "network.lan", "domain.web")
    assert error.position is not None
    where = (Path(error.position.file).name, error.position.line)
    assert where in {("storage.yaml", 4), ("net.yaml", 2), ("vms.yaml", 3)}


def test_backing_cycle(load_files: Load) -> None:
    text = "pools:\n  lab: {path: /var/lib/vmform/lab}\nvolumes:\n  a: {pool: lab, backing: b}\n  b: {pool: lab, backing: a}\n"
    error = cycle_error(load_files, {"backing.yaml": text})
    assert error.message in rotations("volume.a", "volume.b")
    assert error.position is not None and error.position.line in (4, 5)


def test_cycle_position_points_at_the_closing_reference(load_files: Load) -> None:
    # Only one edge of this cycle is written on a line of its own: the error must be placed on an edge
    # of the cycle, never on an unrelated resource.
    text = (
        "pools:\n  lab: {path: /var/lib/vmform/lab}\n"
        "volumes:\n  v: {pool: lab, depends_on: [domain.d]}\n"
        "domains:\n  d:\n    disks: [v]\n  other:\n    depends_on: [domain.d]\n"
    )
    error = cycle_error(load_files, {"c.yaml": text})
    assert error.message in rotations("volume.v", "domain.d")
    assert error.position is not None and error.position.line in (4, 7)


def test_every_independent_cycle_is_reported(load_files: Load) -> None:
    text = (
        "domains:\n  a:\n    depends_on: [domain.a]\n"
        "  b:\n    depends_on: [domain.c]\n  c:\n    depends_on: [domain.b]\n"
        "  d:\n    depends_on: [domain.a]\n"
    )
    manifests = load_files({"two.yaml": text})
    with pytest.raises(ManifestErrors) as info:
        build_graph(manifests)
    messages = sorted(error.message for error in info.value.errors)
    assert len(messages) == 2, messages
    assert messages[0] == "dependency cycle: domain.a -> domain.a"
    assert messages[1] in rotations("domain.b", "domain.c")
