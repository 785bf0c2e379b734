"""Desired-state resources, as read from the manifests, and the index that resolves references."""

from __future__ import annotations

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
    desired: dict[str, Any] = field(default_factory=dict)  # values in libvirt terms, filled by bind
    # Resources its expressions read ({{ volume.base.path }}), with the field that read them: graph edges.
    references: list[tuple[str, tuple[str | int, ...]]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.kind.name}.{self.key}"

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


@dataclass(frozen=True)
class OutputSpec:
    """A project output: an expression evaluated against the host after apply (``vmform output``)."""

    name: str
    value: Any  # usually a string with {{ … }}
    position: Position
    description: str = ""
    sensitive: bool = False


@dataclass
class Manifests:
    """Every resource of a project, by address."""

    project: str
    resources: dict[str, Resource] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    invalid: set[str] = field(default_factory=set)  # addresses declared with errors (already reported)
    outputs: dict[str, OutputSpec] = field(default_factory=dict)  # project outputs, evaluated after apply
    variables: dict[str, Any] = field(default_factory=dict)  # the variables' values this load used

    def get(self, kind: str, key: str) -> Resource | None:
        return self.resources.get(f"{kind}.{key}")

    def of_kind(self, kind: str) -> list[Resource]:
        return [r for r in self.resources.values() if r.kind.name == kind]
