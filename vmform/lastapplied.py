"""vmform's last-applied record: what vmform stated the last time it wrote an object, so that what a manifest
stops stating is removed from the host (a three-way merge, as kubectl apply does with its last-applied
configuration) while what libvirt added, or someone else added outside vmform, is never touched.

The record is compact: the names of the curated fields that have a ``Removal`` (fields without a default;
the others always have a value to go back to) and the ``xml:`` paths the manifest stated, in the form of
``generic.owned_paths`` (``memoryBacking/hugepages``, ``on_crash/_text``, ``clock/@offset``,
``devices/watchdog`` for a whole list). It is written by the providers, in the same call that writes the
object, from the very values they send:

- domains and networks: a child of their owner element,
  ``<vmform:owner …><vmform:applied fields="kernel" xml="memoryBacking/hugepages on_crash/_text"/></vmform:owner>``
  (libvirt keeps one metadata element per namespace, so it cannot be a sibling in the same namespace);
- pools: ``"applied": {"fields": [...], "xml": [...]}`` in their ledger entry (pools have no metadata).

An object without a record (made by an older vmform) has "nothing recorded": nothing is removed from it
until an apply that changes it writes one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lxml import etree

from vmform.ownership import NAMESPACE, PREFIX
from vmform.schema.registry import KINDS
from vmform.schema.xmlbind import Element

XmlPath = tuple[str, ...]


@dataclass(frozen=True)
class AppliedRecord:
    fields: tuple[str, ...] = ()
    xml: tuple[XmlPath, ...] = ()

    def to_entry(self) -> dict[str, list[str]]:
        return {"fields": list(self.fields), "xml": ["/".join(path) for path in self.xml]}

    @classmethod
    def from_entry(cls, entry: Any) -> AppliedRecord | None:
        """The record kept in a ledger entry (None: the entry has none)."""
        if not isinstance(entry, Mapping):
            return None
        fields = [str(name) for name in entry.get("fields") or []]
        paths = [tuple(str(path).split("/")) for path in entry.get("xml") or []]
        return cls.of(fields, paths)

    @classmethod
    def of(cls, fields: Any, paths: Any) -> AppliedRecord:
        return cls(tuple(sorted(set(fields))), tuple(sorted(set(paths))))

    def shown(self) -> list[str]:
        """For plans: the fields, then the xml: paths as the plan names them."""
        return [*self.fields, *(xml_change_path(path) for path in self.xml)]


def xml_change_path(path: XmlPath) -> str:
    """How a plan names an xml: path: ``xml.memoryBacking.hugepages``, ``xml.clock.offset``, ``xml.on_crash``."""
    steps = [step.lstrip("@") for step in path]
    if len(steps) > 1 and steps[-1] == "_text":
        steps.pop()
    return "xml." + ".".join(steps)


def removed_paths(recorded: AppliedRecord, stated: tuple[XmlPath, ...]) -> list[XmlPath]:
    """The recorded xml: paths the section no longer states (nor anything inside them). A device the section no
    longer names at all (``devices/watchdog/@model`` and ``@action`` gone with the whole ``watchdog:``) is
    removed whole: a device without its model is no device, and what libvirt added inside it (its address,
    alias) goes with it."""
    found: list[XmlPath] = []
    for path in recorded.xml:
        if any(now[:len(path)] == path for now in stated):
            continue
        if len(path) > 2 and path[0] == "devices" and not any(now[:2] == path[:2] for now in stated):
            path = path[:2]
        if path not in found:
            found.append(path)
    return found


def record_for(kind: str, values: Mapping[str, Any]) -> AppliedRecord:
    """The record of what these values (a resource's desired values, as sent to libvirt) state."""
    if kind not in KINDS:
        return AppliedRecord()
    fields = [spec.name for spec in KINDS[kind].fields if spec.removal is not None and spec.name in values]
    extra = values.get("xml")
    paths: list[XmlPath] = []
    if extra:
        from vmform.schema.extra_xml import owned_paths

        paths = owned_paths(extra, kind)
    return AppliedRecord.of(fields, paths)


def write_record(root: Element, record: AppliedRecord) -> None:
    """Put the record into a domain's or network's owner element (replacing the one there)."""
    owner = root.find(f"metadata/{{{NAMESPACE}}}owner")
    if owner is None:
        return  # not vmform's: nothing is recorded on it
    for old in owner.findall(f"{{{NAMESPACE}}}applied") + owner.findall("applied"):
        owner.remove(old)
    owner.append(applied_element(record))


def applied_element(record: AppliedRecord) -> Element:
    node = etree.Element(f"{{{NAMESPACE}}}applied", nsmap={PREFIX: NAMESPACE})
    if record.fields:
        node.set("fields", " ".join(record.fields))
    if record.xml:
        node.set("xml", " ".join("/".join(path) for path in record.xml))
    return node


def read_record(root: Element | None) -> AppliedRecord | None:
    """The record on a domain's or network's XML, or None when it has none (an older vmform made it)."""
    if root is None:
        return None
    owner = root.find(f"metadata/{{{NAMESPACE}}}owner")
    if owner is None:
        return None
    node = owner.find(f"{{{NAMESPACE}}}applied")
    if node is None:
        node = owner.find("applied")  # set through virDomainSetMetadata, which namespaces only the top element
    if node is None:
        return None
    fields = (node.get("fields") or "").split()
    paths = [tuple(text.split("/")) for text in (node.get("xml") or "").split()]
    return AppliedRecord.of(fields, paths)


def unset_removed(kind: str, root: Element, change: Any, project: str,
                  recorded: AppliedRecord | None = None) -> dict[str, Any]:
    """Carry out the removals a planned change lists, on the object's own XML (in place): each xml: path vmform
    recorded, no longer stated and named by one of the change's fields is taken out (or put back as vmform
    renders it, see ``generic.unset_path``). Returns the values the curated removals write, for
    ``write_fields`` (the field's ``Removal.value``). ``recorded`` is the record (pools: from the ledger);
    domains and networks: read from ``root``."""
    from vmform.render.xml import render_resource
    from vmform.schema.generic import unset_path

    after = change.after or {}
    planned = {field.path: field for field in change.fields}
    overlay: dict[str, Any] = {}
    for path, field in planned.items():
        spec = KINDS[kind].spec(path)
        if spec is not None and spec.removal is not None and field.after is None and path not in after:
            overlay[path] = spec.removal.value
    recorded = recorded if recorded is not None else read_record(root)
    if recorded is None:
        return overlay
    gone = [path for path in removed_paths(recorded, record_for(kind, after).xml) if xml_change_path(path) in planned]
    if gone:
        rendered = render_resource(kind, change.name, after, project, change.address)
        for path in gone:
            unset_path(root, path, kind, rendered)
    return overlay
