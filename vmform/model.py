"""Desired-state resources, as read from the manifests, and the index that resolves references."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from vmform.errors import Position
from vmform.manifest.yamlsource import Path, SourceMap
from vmform.schema.kind import Kind


@dataclass
class Resource:
    """One declared object: its kind, manifest key and parsed (normalised, manifest-terms) values."""

    kind: Kind
    key: str
    values: dict[str, Any]
    source: SourceMap
    path: Path  # where its mapping sits in its document, e.g. ("domains", "web")
    host: str = "default"
    # The module instances it was declared in, outermost first: ("web",) or ('workers["a"]', "disk").
    module: tuple[str, ...] = ()
    desired: dict[str, Any] = field(default_factory=dict)  # values in libvirt terms, filled by bind
    # Resources its expressions read ({{ volume.base.path }}), with the field that read them: graph edges.
    references: list[tuple[str, tuple[str | int, ...]]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return scoped_address(self.module, f"{self.kind.name}.{self.key}")

    @property
    def libvirt_name(self) -> str:
        return str(self.values.get("name") or self.key)

    @property
    def depends_on(self) -> list[str]:
        return list(self.values.get("depends_on") or [])

    @property
    def lifecycle(self) -> dict[str, Any]:
        return dict(self.values.get("lifecycle") or {})

    def restart_allowed(self, everywhere: bool) -> bool:
        return everywhere or self.values.get("restart_policy") == "allowed"

    def position(self, *relative: str | int) -> Position:
        return self.source.value((*self.path, *relative))

    def key_position(self, *relative: str | int) -> Position:
        return self.source.key((*self.path, *relative))


MODULE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")  # no dots: addresses are split at them
_MODULE_STEP = re.compile(r'module\.[A-Za-z][A-Za-z0-9_-]*(?:\[(?:\d+|"[^"]*")\])?\.')


def local_address(address: str) -> str:
    """An address without the modules it sits in: module.web["a"].domain.vm -> domain.vm."""
    position = 0
    while match := _MODULE_STEP.match(address, position):
        position = match.end()
    return address[position:]


def module_prefix(module: tuple[str, ...]) -> str:
    """``module.web`` for ("web",); ``module.a.module.b`` for ("a", "b"); "" at the project's root."""
    return ".".join(f"module.{name}" for name in module)


def scoped_address(module: tuple[str, ...], local: str) -> str:
    return f"{module_prefix(module)}.{local}" if module else local


def enclosing(module: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Where a name used in ``module`` is looked for: the module itself, then each module around it, then the
    project's root (so a module can name what the project that uses it declares, passed in as an input)."""
    return [module[:depth] for depth in range(len(module), -1, -1)]


@dataclass(frozen=True)
class OutputSpec:
    """A project output: an expression evaluated against the host after apply (``vmform output``)."""

    name: str
    value: Any  # usually a string with {{ … }}
    position: Position
    description: str = ""
    sensitive: bool = False


@dataclass
class ModuleInstance:
    """One use of a module (or one of its count/for_each instances): where it came from and what it offers."""

    module: tuple[str, ...]  # its own path: ("web",), ('workers["a"]',), ("lab", "net")
    source: str  # the module's directory, as shown to the user
    position: Position  # its entry under modules:
    variables: dict[str, Any] = field(default_factory=dict)  # its inputs' values
    outputs: dict[str, OutputSpec] = field(default_factory=dict)
    depends_on: list[str] = field(default_factory=list)  # addresses, in the scope that uses the module
    # The resources each input read ({{ module.lab.network }}): what reads that variable in the module needs them.
    input_reads: dict[str, list[str]] = field(default_factory=dict)
    loaded: bool = False  # its inputs evaluated and its manifests loaded
    failed: bool = False  # its inputs are wrong (reported): nothing of it is loaded

    @property
    def address(self) -> str:
        return module_prefix(self.module)


@dataclass
class Manifests:
    """Every resource of a project, by address."""

    project: str
    resources: dict[str, Resource] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    invalid: set[str] = field(default_factory=set)  # addresses declared with errors (already reported)
    outputs: dict[str, OutputSpec] = field(default_factory=dict)  # project outputs, evaluated after apply
    variables: dict[str, Any] = field(default_factory=dict)  # the variables' values this load used
    modules: dict[str, ModuleInstance] = field(default_factory=dict)  # by address: module.web["a"]

    def get(self, kind: str, key: str) -> Resource | None:
        return self.resources.get(f"{kind}.{key}")

    def of_kind(self, kind: str) -> list[Resource]:
        return [r for r in self.resources.values() if r.kind.name == kind]

    def resolve(self, kind: str, key: str, module: tuple[str, ...] = ()) -> Resource | None:
        """The resource a name refers to, used from inside ``module`` (see enclosing)."""
        for scope in enclosing(module):
            found = self.resources.get(scoped_address(scope, f"{kind}.{key}"))
            if found is not None:
                return found
            if key.startswith("module."):  # one a module declares, by its address: module.lab.network.net
                found = self.resources.get(scoped_address(scope, key))
                if found is not None and found.kind.name == kind:
                    return found
        return None

    def declared_invalid(self, kind: str, key: str, module: tuple[str, ...] = ()) -> bool:
        return any(scoped_address(scope, f"{kind}.{key}") in self.invalid or scoped_address(scope, key) in self.invalid
                   for scope in enclosing(module))

    def visible(self, kind: str, module: tuple[str, ...] = ()) -> list[str]:
        """The names of a kind a resource in ``module`` can refer to (for did-you-mean hints)."""
        scopes = set(enclosing(module))
        return [r.key for r in self.resources.values() if r.kind.name == kind and r.module in scopes]

    def dependency_targets(self, address: str, module: tuple[str, ...] = ()) -> list[str]:
        """What a depends_on entry written in ``module`` means: one resource, or every resource of a module
        (``module.db``, ``module.workers["a"]``)."""
        for scope in enclosing(module):
            full = scoped_address(scope, address)
            if full in self.resources:
                return [full]
            inside = [a for a in self.resources if a.startswith(full + ".") or a.startswith(full + "[")] \
                if address.startswith("module.") else []
            if inside:
                return inside
        return []

    def in_scope(self, module: tuple[str, ...]) -> ScopedIndex:
        return ScopedIndex(self, module)

    def module_of(self, resource: Resource) -> ModuleInstance | None:
        return self.modules.get(module_prefix(resource.module)) if resource.module else None


@dataclass(frozen=True)
class ScopedIndex:
    """The manifests as seen from inside one module: what a resource's bind reads its references through."""

    manifests: Manifests
    module: tuple[str, ...]

    @property
    def project(self) -> str:
        return self.manifests.project

    def get(self, kind: str, key: str) -> Resource | None:
        return self.manifests.resolve(kind, key, self.module)
