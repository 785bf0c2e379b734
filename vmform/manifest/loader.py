"""Reading manifest files into resources, collecting every mistake with its file:line:column."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from vmform.errors import ManifestError, ManifestErrors, Position
from vmform.images import file_digest, is_url
from vmform.manifest.expressions import NotReady, ResourceReader, evaluate_tree
from vmform.manifest.variables import Declaration, Recorder, VariableInputs, parse_declaration, resolve
from vmform.manifest.yamlsource import SourceMap, YamlDocument, load_yaml
from vmform.model import Manifests, OutputSpec, Resource
from vmform.schema.extra_xml import YIELDS_WITH, foreign_paths, overlap, owned_paths, regions
from vmform.schema.kind import EXISTING_KEYS, Kind, field_references
from vmform.schema.network import add_reservations
from vmform.schema.registry import KINDS, SECTIONS
from vmform.schema.types import NAME, FieldError, FieldErrors, did_you_mean, parse_fields
from vmform.schema.xslt import Stylesheet

MAX_MANIFEST_BYTES = 16 * 1024 * 1024
VARIABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


class _Collector:
    def __init__(self) -> None:
        self.errors: list[ManifestError] = []

    def add(self, message: str, position: Position | None) -> None:
        # Instances of one counted resource share their source: report each mistake once.
        if not any(e.message == message and e.position == position for e in self.errors):
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


def load_manifests(project_name: str, files: Iterable[Path], root: Path | None = None,
                   settings: Mapping[str, Any] | None = None, inputs: VariableInputs | None = None) -> Manifests:
    """Load, check and bind every resource; raises ManifestErrors listing all mistakes. ``settings`` is the
    parsed vmform.toml (its [variables] and [vars]); ``inputs`` the variables set from outside."""
    collector = _Collector()
    manifests = Manifests(project_name)
    loaded: list[tuple[Path, YamlDocument]] = []
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
        loaded.extend((file, document) for document in documents)
    scope = _variables(loaded, settings or {}, _display_path(root / "vmform.toml", root) if root else "vmform.toml",
                       inputs, collector)
    for file, document in loaded:
        _load_document(document, file, manifests, collector, scope)
    _run_tasks(scope, collector)
    manifests.variables = dict(scope.values)
    _check_references(manifests, collector)
    if collector.errors:
        raise ManifestErrors(collector.errors)
    for resource in manifests.resources.values():
        resource.desired = resource.kind.bind(resource, manifests)
        _check_extra_xml(resource, collector)
    for domain, relative, message in add_reservations(manifests):
        collector.add(message, domain.position(*relative))
    for resource in manifests.resources.values():
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


@dataclass
class _Scope:
    """What expressions see: the variables' values, and which of them are sensitive."""

    values: dict[str, Any] = field(default_factory=dict)
    sensitive: set[str] = field(default_factory=set)
    # Instances waiting to be evaluated and loaded (references to other resources decide the order).
    tasks: list[Callable[[], None]] = field(default_factory=list)
    declared: set[str] = field(default_factory=set)  # addresses of every instance, loaded or not


def _variables(loaded: list[tuple[Path, YamlDocument]], settings: Mapping[str, Any], project_file: str,
               inputs: VariableInputs | None, collector: _Collector) -> _Scope:
    declarations: dict[str, Declaration] = {}

    def declare(name: Any, raw: Any, position: Position) -> None:
        if not isinstance(name, str) or not VARIABLE_NAME.fullmatch(name):
            collector.add(f"variable name {name!r} must be letters, digits and _ (starting with a letter)", position)
            return
        if name in declarations:
            collector.add(f"variable '{name}' is declared twice (first at {declarations[name].position})", position)
            return
        declaration, problem = parse_declaration(name, raw, position)
        if problem:
            collector.add(problem, position)
        elif declaration is not None:
            declarations[name] = declaration

    table = settings.get("variables") or {}
    for name, raw in (table.items() if isinstance(table, Mapping) else []):
        declare(name, raw, Position(project_file, 1, 1))
    for _file, document in loaded:
        section = document.data.get("variables") if isinstance(document.data, dict) else None
        if section is None:
            continue
        if not isinstance(section, dict):
            collector.add("'variables' must be a mapping of variable names to {type, default, …}",
                          document.source.value(("variables",)))
            continue
        for name, raw in section.items():
            declare(name, raw, document.source.key(("variables", name)))
    project_values = settings.get("vars") or {}
    values, errors = resolve(declarations, project_values if isinstance(project_values, Mapping) else {},
                             project_file, inputs)
    for message, position in errors:
        collector.add(message, position)  # None: set from the command line or the environment
    return _Scope(values, {name for name, d in declarations.items() if d.sensitive})


def _load_document(document: YamlDocument, file: Path, manifests: Manifests, collector: _Collector,
                   scope: _Scope | None = None) -> None:
    scope = scope or _Scope()
    data, source = document.data, document.source
    if data is None:
        return
    if not isinstance(data, dict):
        collector.add("a manifest must be a mapping of sections (domains:, networks:, pools:, volumes:)", source.value(()))
        return
    for section, body in data.items():
        if section == "variables":
            continue  # read first, by _variables
        if section == "outputs":
            _load_outputs(body, source, manifests, collector)
            continue
        kind = SECTIONS.get(section)
        if kind is None:
            hint = did_you_mean(section, [*SECTIONS, "variables", "outputs"])
            collector.add(f"unknown section '{section}'{hint} (sections: {', '.join(SECTIONS)}, variables, outputs)",
                          source.key((section,)))
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            collector.add(f"'{section}' must be a mapping of names to {kind.name} definitions", source.value((section,)))
            continue
        for key, raw in body.items():
            _expand_resource(kind, key, raw, file, source, manifests, collector, scope)


MAX_INSTANCES = 1000


def _load_outputs(body: Any, source: SourceMap, manifests: Manifests, collector: _Collector) -> None:
    if body is None:
        return
    if not isinstance(body, dict):
        collector.add("'outputs' must be a mapping of names to {value, description, sensitive}",
                      source.value(("outputs",)))
        return
    for name, raw in body.items():
        position = source.key(("outputs", name))
        if not isinstance(name, str) or not VARIABLE_NAME.fullmatch(name):
            collector.add(f"output name {name!r} must be letters, digits and _ (starting with a letter)", position)
            continue
        spec = raw if isinstance(raw, dict) else {"value": raw}
        unknown = set(spec) - {"value", "description", "sensitive"}
        if unknown or "value" not in spec:
            collector.add(f"output '{name}': write {{value, description, sensitive}} or just the value", position)
            continue
        if name in manifests.outputs:
            collector.add(f"output '{name}' is declared twice (first at {manifests.outputs[name].position})", position)
            continue
        manifests.outputs[name] = OutputSpec(name, spec["value"], source.value(("outputs", name)),
                                             str(spec.get("description") or ""), bool(spec.get("sensitive", False)))


def _expand_resource(kind: Kind, key: Any, raw: Any, file: Path, source: SourceMap, manifests: Manifests,
                     collector: _Collector, scope: _Scope) -> None:
    """count / for_each make instances (worker[0], worker["a"]); then each instance's expressions are
    evaluated with var, index and each, and the instance is loaded as a resource."""
    path = (kind.section, key)
    try:
        NAME.parse(key)
    except FieldError as exc:
        collector.add(f"{kind.name} name {exc.message}", source.key(path))
        return
    if not isinstance(raw, dict) or ("count" not in raw and "for_each" not in raw):
        _queue(kind, key, raw, None, {}, file, source, manifests, collector, scope, path)
        return
    body = {k: v for k, v in raw.items() if k not in ("count", "for_each")}
    if "count" in raw and "for_each" in raw:
        collector.add("a resource takes count or for_each, not both", source.key((*path, "for_each")))
        return
    repeat_key = "count" if "count" in raw else "for_each"
    repeat, errors = evaluate_tree(raw[repeat_key], {"var": Recorder(scope.values)}, (*path, repeat_key))
    for where, message in errors:
        collector.add(message, source.value(where))
    if errors:
        return
    instances: list[tuple[str, str, dict[str, Any]]] = []
    if repeat_key == "count":
        if isinstance(repeat, bool) or not isinstance(repeat, int) or not 0 <= repeat <= MAX_INSTANCES:
            collector.add(f"count must be a whole number from 0 to {MAX_INSTANCES}, got {repeat!r}",
                          source.value((*path, "count")))
            return
        instances = [(f"{key}[{number}]", f"{key}-{number}", {"index": number}) for number in range(repeat)]
    else:
        if isinstance(repeat, list):
            if not all(isinstance(item, str) for item in repeat) or len(set(repeat)) != len(repeat):
                collector.add("for_each over a list takes distinct strings (use a mapping for anything else)",
                              source.value((*path, "for_each")))
                return
            items = [(item, item) for item in repeat]
        elif isinstance(repeat, dict):
            items = [(str(each_key), value) for each_key, value in repeat.items()]
        else:
            collector.add(f"for_each takes a mapping or a list of strings, got {repeat!r}", source.value((*path, "for_each")))
            return
        if len(items) > MAX_INSTANCES:
            collector.add(f"for_each makes more than {MAX_INSTANCES} instances", source.value((*path, "for_each")))
            return
        for each_key, value in items:
            try:
                NAME.parse(f"{key}-{each_key}")
            except FieldError:
                collector.add(f"for_each key {each_key!r} cannot be part of a libvirt name (letters, digits, _.+-)",
                              source.value((*path, "for_each")))
                return
            instances.append((f'{key}["{each_key}"]', f"{key}-{each_key}", {"each": {"key": each_key, "value": value}}))
    for instance_key, default_name, extra in instances:
        _queue(kind, instance_key, body, default_name, extra, file, source, manifests, collector, scope, path)


def _queue(kind: Kind, key: str, raw: Any, default_name: str | None, extra: dict[str, Any], file: Path,
           source: SourceMap, manifests: Manifests, collector: _Collector, scope: _Scope,
           path: tuple[str | int, ...]) -> None:
    scope.declared.add(f"{kind.name}.{key}")
    scope.tasks.append(lambda: _load_evaluated(kind, key, raw, default_name, extra, file, source, manifests,
                                               collector, scope, path))


def _run_tasks(scope: _Scope, collector: _Collector) -> None:
    """Load every instance, those whose expressions read other resources after those resources."""
    pending = list(scope.tasks)
    while pending:
        waiting = []
        for task in pending:
            try:
                task()
            except NotReady as not_ready:
                waiting.append((task, not_ready))
        if len(waiting) == len(pending):  # no progress: they wait for each other
            for _task, stuck in waiting:
                collector.add(f"{stuck.address}'s values refer to {stuck.wanted}, whose values refer back to it "
                              "(an expression cycle)", stuck.position)
            return
        pending = [task for task, _exc in waiting]


def _load_evaluated(kind: Kind, key: str, raw: Any, default_name: str | None, extra: dict[str, Any], file: Path,
                    source: SourceMap, manifests: Manifests, collector: _Collector, scope: _Scope,
                    path: tuple[str | int, ...]) -> None:
    if isinstance(raw, dict):
        evaluated: dict[str, Any] = {}
        failed = False
        references: list[tuple[str, tuple[str | int, ...]]] = []
        for field_name, value in raw.items():
            recorder = Recorder(scope.values)
            reader = ResourceReader(manifests, scope.declared, f"{kind.name}.{key}", source.value((*path, field_name)))
            result, errors = evaluate_tree(value, {"var": recorder, **extra, **reader.namespaces()}, (*path, field_name))
            references.extend((address, (field_name,)) for address in reader.read)
            for where, message in errors:
                collector.add(message, source.value(where))
            failed |= bool(errors)
            secret = sorted(recorder.read & scope.sensitive)
            spec = kind.spec(str(field_name))
            if secret and not (spec is not None and spec.sensitive):
                collector.add(f"sensitive variable '{secret[0]}' may only be used in sensitive fields (it would be "
                              "shown in plans here)", source.value((*path, field_name)))
                failed = True
            evaluated[field_name] = result
        if failed:
            manifests.invalid.add(f"{kind.name}.{key}")
            return
        if default_name is not None and evaluated.get("name") is None:
            evaluated["name"] = default_name
        raw = evaluated
        _load_resource(kind, key, raw, file, source, manifests, collector, path)
        loaded = manifests.resources.get(f"{kind.name}.{key}")
        if loaded is not None:
            loaded.references = references
        return
    _load_resource(kind, key, raw, file, source, manifests, collector, path)


def _load_resource(
    kind: Kind, key: str, raw: Any, file: Path, source: SourceMap, manifests: Manifests, collector: _Collector,
    path: tuple[str | int, ...],
) -> None:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        collector.add(f"{kind.name} '{key}' must be a mapping of its settings", source.value(path))
        return
    if raw.get("existing") is True:
        allowed = EXISTING_KEYS.get(kind.name)
        if allowed is None:
            collector.add(f"a {kind.name} cannot be existing: vmform creates {kind.section}",
                          source.key((*path, "existing")))
            manifests.invalid.add(f"{kind.name}.{key}")
            return
        for extra in [k for k in raw if k not in allowed]:
            collector.add(f"an existing {kind.name} is only used, not configured: drop '{extra}' "
                          f"(it may say {', '.join(allowed)})", source.key((*path, extra)))
        raw = {k: v for k, v in raw.items() if k in allowed}
        fields = tuple(spec for spec in kind.all_fields if spec.name in allowed)
        try:
            values = parse_fields(fields, raw)
        except FieldError as exc:
            collector.field_errors(exc, source, path)
            manifests.invalid.add(f"{kind.name}.{key}")
            return
        resource = Resource(kind, key, values, source, path)
        if resource.address not in manifests.resources:
            manifests.resources[resource.address] = resource
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
    if kind.name == "volume" and values.get("source") is not None and not is_url(values["source"]):
        image = Path(values["source"])
        if not image.is_absolute():
            image = (file.parent / image).resolve()
        try:
            found = image.is_file()
        except OSError as exc:  # a name too long for the filesystem, …
            collector.add(f"source image {values['source'][:80]!r}: {exc.strerror}", source.value((*path, "source")))
            found = None
        if found is False:
            collector.add(f"source image {values['source']} not found (looked at {image})", source.value((*path, "source")))
        elif found and values.get("sha256") and file_digest(image) != values["sha256"].lower():
            collector.add(f"source image {values['source']} has sha256 {file_digest(image)}, not the {values['sha256']} "
                          "the manifest expects", source.value((*path, "sha256")))
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
