"""The dependency graph of declared resources: edges from references and depends_on, order, cycles."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmform.errors import ManifestError, ManifestErrors
from vmform.model import module_prefix
from vmform.schema.kind import field_references

if TYPE_CHECKING:
    import networkx as nx

    from vmform.model import Manifests


def build_graph(manifests: Manifests) -> nx.DiGraph:
    """A DiGraph whose edge A -> B means B depends on A (A is created first)."""
    import networkx as nx  # heavy import, only needed once we plan

    graph = nx.DiGraph()
    for address in manifests.resources:
        graph.add_node(address)
    for address, resource in manifests.resources.items():
        for relative, kind, name in field_references(resource.kind.fields, resource.values):
            found = manifests.resolve(kind, name, resource.module)
            if found is not None:
                graph.add_edge(found.address, address, via=relative)
        for number, entry in enumerate(resource.depends_on):
            for target in manifests.dependency_targets(entry, resource.module):
                graph.add_edge(target, address, via=("depends_on", number))
        # depends_on on a modules: entry holds for everything the module declares.
        for depth in range(1, len(resource.module) + 1):
            instance = manifests.modules.get(module_prefix(resource.module[:depth]))
            if instance is None:
                continue
            for entry in instance.depends_on:
                for target in manifests.dependency_targets(entry, resource.module[:depth - 1]):
                    if not target.startswith(instance.address + "."):
                        graph.add_edge(target, address, via=())
        for target, via in resource.references:
            if target in manifests.resources and target != address:
                graph.add_edge(target, address, via=via)
    errors = []
    # One error per strongly connected component that loops, so every independent cycle is reported at once.
    for component in nx.strongly_connected_components(graph):
        first = next(iter(component))
        if len(component) == 1 and not graph.has_edge(first, first):
            continue
        cycle = nx.find_cycle(graph.subgraph(component), source=min(component))
        members = [edge[0] for edge in cycle]
        chain = " -> ".join([*members, members[0]])
        source, target = cycle[0]
        via = graph.edges[source, target]["via"]
        errors.append(ManifestError(f"dependency cycle: {chain}", manifests.resources[target].position(*via)))
    if errors:
        raise ManifestErrors(sorted(errors, key=lambda error: str(error.position)))
    return graph


def creation_order(graph: nx.DiGraph) -> list[str]:
    import networkx as nx

    return list(nx.lexicographical_topological_sort(graph))


def _edges(graph: nx.DiGraph) -> list[tuple[str, str]]:
    return sorted(graph.edges())


def to_dot(graph: nx.DiGraph, title: str = "vmform") -> str:
    """Graphviz DOT: one node per address, an edge A -> B when B needs A (A is created first)."""
    def quoted(text: str) -> str:  # addresses of instances hold quotes: domain.worker["a"]
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {quoted(title)} {{", "  rankdir=LR;", "  node [shape=box];"]
    lines += [f"  {quoted(address)};" for address in creation_order(graph)]
    lines += [f"  {quoted(source)} -> {quoted(target)};" for source, target in _edges(graph)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(graph: nx.DiGraph, title: str = "vmform") -> str:
    """A Mermaid flowchart (renders in GitHub and GitLab markdown); node ids are n0, n1, … labelled
    with the addresses, since Mermaid ids cannot hold dots."""
    ids = {address: f"n{number}" for number, address in enumerate(creation_order(graph))}
    lines = ["flowchart LR", f"  %% vmform project {title}"]
    lines += [f'  {ids[address]}["{address.replace(chr(34), "#quot;")}"]' for address in ids]
    lines += [f"  {ids[source]} --> {ids[target]}" for source, target in _edges(graph)]
    return "\n".join(lines) + "\n"
