"""Reading manifest files into resources, collecting every mistake with its file:line:column."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lxml import etree

from vmform.errors import ManifestError, ManifestErrors, Position
from vmform.manifest.yamlsource import SourceMap, YamlDocument, load_yaml
from vmform.model import Manifests, Resource
from vmform.schema.extra_xml import YIELDS_WITH, foreign_paths, overlap, owned_paths, regions
from vmform.schema.kind import Kind, field_references
from vmform.schema.registry import KINDS, SECTIONS
from vmform.schema.types import NAME, FieldError, FieldErrors, did_you_mean, parse_fields
from vmform.schema.xslt import Stylesheet

MAX_MANIFEST_BYTES = 16 * 1024 * 1024


class _Collector:
    def __init__(self) -> None:
        self.errors: list[ManifestError] = []

    def add(self, message: str, position: Position) -> None:
        self.errors.append(ManifestError(message, position))

    def field_errors(self, exc: FieldError, source: SourceMap, base: tuple[str | int, ...]) -> None:
        problems = exc.errors if isinstance(exc, FieldErrors) else [exc]
        for problem in problems:
            path = (*base, *problem.path)
            position = source.key(path) if problem.at_key else source.value(path)
            self.add(problem.message, position)


def _display_path(path: Path, root: Path | None) -> str:
    """Paths in messages are relative to the project root (as they appear in the repository)."""
    try:
        return os.path.relpath(path, root) if root is not None else os.path.relpath(path)
    except ValueError:
        return str(path)


def load_manifests(project_name: str, files: Iterable[Path], root: Path | None = None) -> Manifests:
    """Load, check and bind every resource; raises ManifestErrors listing all mistakes."""
    collector = _Collector()
    manifests = Manifests(project_name)
    for file in files:
        shown = _display_path(file, root)
        manifests.files.append(shown)
        try:
            if file.stat().st_size > MAX_MANIFEST_BYTES:
                collector.add(f"manifest is larger than {MAX_MANIFEST_BYTES // 1024**2} MiB", Position(shown, 1, 1))
                continue
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            collector.add("manifest is not valid UTF-8", Position(shown, 1, 1))
            continue
        except OSError as exc:
            collector.add(f"cannot read manifest: {exc.strerror}", Position(shown, 1, 1))
            continue
        documents, errors = load_yaml(text, shown)
        collector.errors.extend(errors)
        for document in documents:
            _load_document(document, file, manifests, collector)
    _check_references(manifests, collector)
    if collector.errors:
        raise ManifestErrors(collector.errors)
    for resource in manifests.resources.values():
        resource.desired = resource.kind.bind(resource, manifests)
        _check_extra_xml(resource, collector)
        _check_stylesheet(resource, collector)
    if collector.errors:
        raise ManifestErrors(collector.errors)
    return manifests


FOREIGN_REFUSED = ("XML outside libvirt's own namespace ({what}) can make QEMU or dnsmasq do anything; it is "
                   "refused unless the resource says allow: [foreign_xml]")


def _check_foreign_xml(resource: Resource, collector: _Collector) -> None:
    if "foreign_xml" in (resource.values.get("allow") or []):
        return
    for where in foreign_paths(resource.values.get("xml")):
        collector.add(FOREIGN_REFUSED.format(what=where[-1]), resource.key_position("xml", *where))


def _check_stylesheet(resource: Resource, collector: _Collector) -> None:
    """A stylesheet must be idempotent (so the host can be checked against it) and must not bring XML from
    outside libvirt's namespace (qemu:commandline, …) in by the back door."""
    text = resource.desired.get("xslt")
    if not text:
        return
    from vmform.render.xml import render_resource
    from vmform.schema.xslt import canonical, transform

    try:
        once = render_resource(resource.kind.name, resource.libvirt_name, resource.desired, "check", resource.address)
        twice = transform(text, once)
    except FieldError as exc:
        collector.add(exc.message, resource.position("xslt"))
        return
    if canonical(twice) != canonical(once):
        collector.add("the XSLT stylesheet is not idempotent: run over its own output it changes it again, so the "
                      "host could never match it", resource.position("xslt"))
    for element in once.iter():
        if not isinstance(element.tag, str) or element.getparent() is not None and element.getparent().tag == "metadata":
            continue
        namespace = etree.QName(element).namespace
        if namespace and not any(a.tag == "metadata" for a in element.iterancestors()) and \
                "foreign_xml" not in (resource.values.get("allow") or []):
            what = f"the XSLT stylesheet adds <{etree.QName(element).localname}> in {namespace}"
            collector.add(FOREIGN_REFUSED.format(what=what), resource.position("xslt"))
            break


def _check_extra_xml(resource: Resource, collector: _Collector) -> None:
    """A curated field and the xml: section may not both set one part of the document. A curated field the
    manifest does not write (only its default would apply) yields that part to the xml: section."""
    extra = resource.desired.get("xml")
    if not extra:
        return
    owned = owned_paths(extra, resource.kind.name)
    for spec in resource.kind.fields:
        if spec.name == "xml" or spec.binding is None or not spec.xml:
            continue
        hit = next(((o, r) for o in owned for r in regions(spec, resource.kind.name) if overlap(o, r)), None)
        if hit is None:
            continue
        if (*resource.path, spec.name) in resource.source.keys:
            where = "/".join(step for step in hit[1] if step != "_text").replace("/@", " @")
            shown = ".".join(step.lstrip("@") for step in hit[0] if step != "_text")
            collector.add(f"xml: {shown} sets <{where}>, which '{spec.name}' (at "
                          f"{resource.key_position(spec.name)}) sets too; write it in one place",
                          resource.position("xml", *(step.lstrip("@") for step in hit[0] if step != "_text")))
        else:
            resource.desired.pop(spec.name, None)
            # A default bounded by the yielded field yields with it (currentMemory must fit in memory).
            follower = YIELDS_WITH.get((resource.kind.name, spec.name))
            if follower and (*resource.path, follower) not in resource.source.keys:
                resource.desired.pop(follower, None)


def _load_document(document: YamlDocument, file: Path, manifests: Manifests, collector: _Collector) -> None:
    data, source = document.data, document.source
    if data is None:
        return
    if not isinstance(data, dict):
        collector.add("a manifest must be a mapping of sections (domains:, networks:, pools:, volumes:)", source.value(()))
        return
    for section, body in data.items():
        kind = SECTIONS.get(section)
        if kind is None:
            hint = did_you_mean(section, list(SECTIONS))
            collector.add(f"unknown section '{section}'{hint} (sections: {', '.join(SECTIONS)})", source.key((section,)))
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            collector.add(f"'{section}' must be a mapping of names to {kind.name} definitions", source.value((section,)))
            continue
        for key, raw in body.items():
            _load_resource(kind, key, raw, file, source, manifests, collector)


def _load_resource(
    kind: Kind, key: str, raw: Any, file: Path, source: SourceMap, manifests: Manifests, collector: _Collector
) -> None:
    path = (kind.section, key)
    try:
        NAME.parse(key)
    except FieldError as exc:
        collector.add(f"{kind.name} name {exc.message}", source.key(path))
        return
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        collector.add(f"{kind.name} '{key}' must be a mapping of its settings", source.value(path))
        return
    try:
        values = parse_fields(kind.all_fields, raw)
    except FieldError as exc:
        collector.field_errors(exc, source, path)
        manifests.invalid.add(f"{kind.name}.{key}")  # declared, though wrong: references to it are fine
        return
    lifecycle = values.get("lifecycle") or {}
    names = [spec.name for spec in kind.fields if spec.compare]
    for number, field_name in enumerate(lifecycle.get("ignore_changes", [])):
        if field_name not in names:
            collector.add(f"ignore_changes: {kind.name} has no field '{field_name}'{did_you_mean(field_name, names)}",
                          source.value((*path, "lifecycle", "ignore_changes", number)))
    if kind.check is not None:
        for relative, message in kind.check(values):
            collector.add(message, source.value((*path, *relative)))
    stylesheet = values.get("xslt")
    if isinstance(stylesheet, str) and stylesheet.startswith("file:"):
        sheet_path = Path(stylesheet[len("file:"):])
        if not sheet_path.is_absolute():
            sheet_path = (file.parent / sheet_path).resolve()
        try:
            values["xslt"] = sheet_path.read_text(encoding="utf-8")
            Stylesheet().parse(values["xslt"])
        except (OSError, UnicodeDecodeError) as exc:
            collector.add(f"cannot read the stylesheet {sheet_path}: {getattr(exc, 'strerror', None) or exc}",
                          source.value((*path, "xslt")))
        except FieldError as exc:
            collector.add(f"{sheet_path}: {exc.message}", source.value((*path, "xslt")))
    if kind.name == "volume" and values.get("source") is not None:
        image = Path(values["source"])
        if not image.is_absolute():
            image = (file.parent / image).resolve()
        if not image.is_file():
            collector.add(f"source image {values['source']} not found (looked at {image})", source.value((*path, "source")))
        values["source"] = str(image)
    if kind.name == "cloudinit":
        _read_seed_files(values, file, source, path, collector)
    resource = Resource(kind, key, values, source, path)
    _check_foreign_xml(resource, collector)
    existing = manifests.resources.get(resource.address)
    if existing is not None:
        first = existing.key_position()
        collector.add(f"{resource.address} is declared twice (first at {first})", source.key(path))
        return
    manifests.resources[resource.address] = resource


MAX_SEED_FILE_BYTES = 1024 * 1024


def _read_seed_files(values: dict[str, Any], file: Path, source: SourceMap, path: tuple[str | int, ...],
                     collector: _Collector) -> None:
    """``{file: PATH}`` in a cloud-init seed: the file's text, read relative to the manifest."""
    for name in ("user_data", "network_config"):
        value = values.get(name)
        if not isinstance(value, dict):
            continue
        target = Path(value["file"])
        if not target.is_absolute():
            target = (file.parent / target).resolve()
        position = source.value((*path, name, "file"))
        try:
            if target.stat().st_size > MAX_SEED_FILE_BYTES:
                collector.add(f"{value['file']} is larger than 1 MiB", position)
                continue
            values[name] = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            collector.add(f"{name} file {value['file']} not found (looked at {target})", position)
        except UnicodeDecodeError:
            collector.add(f"{name} file {value['file']} is not UTF-8 text", position)
        except OSError as exc:
            collector.add(f"cannot read {name} file {value['file']}: {exc.strerror}", position)


def _check_references(manifests: Manifests, collector: _Collector) -> None:
    names: dict[tuple[str, str], str] = {}
    for resource in manifests.resources.values():
        for relative, kind, name in field_references(resource.kind.fields, resource.values):
            if manifests.get(kind, name) is None and f"{kind}.{name}" not in manifests.invalid:
                known = [r.key for r in manifests.of_kind(kind)]
                hint = did_you_mean(name, known)
                collector.add(f"{resource.address} refers to {kind} '{name}', which is not declared{hint}",
                              resource.position(*relative))
        for number, address in enumerate(resource.depends_on):
            if address not in manifests.resources and address not in manifests.invalid:
                hint = did_you_mean(address, list(manifests.resources))
                collector.add(f"depends_on: no resource '{address}'{hint}", resource.position("depends_on", number))
        # Two resources of a kind may not share a libvirt object (volumes: within their pool).
        scope = resource.values.get("pool", "") if resource.kind.name == "volume" else ""
        identity = (resource.kind.name, f"{scope}/{resource.libvirt_name}")
        if identity in names:
            collector.add(f"{resource.address} has the same libvirt name '{resource.libvirt_name}' as {names[identity]}",
                          resource.key_position())
        else:
            names[identity] = resource.address


def kind_of(address: str) -> Kind | None:
    return KINDS.get(address.split(".", 1)[0])
