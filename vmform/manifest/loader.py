"""Reading manifest files into resources, collecting every mistake with its file:line:column."""

from __future__ import annotations

import functools
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
from vmform.manifest.variables import (
    Declaration,
    Recorder,
    VariableInputs,
    parse_declaration,
    resolve,
    type_matches,
)
from vmform.manifest.yamlsource import SourceMap, YamlDocument, load_yaml
from vmform.model import MODULE_NAME, Manifests, ModuleInstance, OutputSpec, Resource, scoped_address
from vmform.project import extra_pool_roots, host_names
from vmform.schema import optins
from vmform.schema.extra_xml import YIELDS_WITH, foreign_paths, overlap, owned_paths, regions
from vmform.schema.kind import EXISTING_KEYS, Kind, field_references
from vmform.schema.network import add_reservations
from vmform.schema.registry import SECTIONS
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


def _read_manifest(file: Path, root: Path | None, collector: _Collector) -> list[YamlDocument]:
    shown = _display_path(file, root)
    try:
        if file.stat().st_size > MAX_MANIFEST_BYTES:
            collector.add(f"manifest is larger than {MAX_MANIFEST_BYTES // 1024**2} MiB", Position(shown, 1, 1))
            return []
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        collector.add("manifest is not valid UTF-8", Position(shown, 1, 1))
        return []
    except OSError as exc:
        collector.add(f"cannot read manifest: {exc.strerror}", Position(shown, 1, 1))
        return []
    documents, errors = load_yaml(text, shown)
    collector.errors.extend(errors)
    return documents


def module_files(directory: Path) -> list[Path]:
    """A module's manifests: its *.yaml and *.yml files, in name order."""
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


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
    manifests.hosts, manifests.default_host = host_names(dict(settings or {}))
    loaded: list[tuple[Path, YamlDocument]] = []
    for file in files:
        manifests.files.append(_display_path(file, root))
        loaded.extend((file, document) for document in _read_manifest(file, root, collector))
    scope = _variables(loaded, settings or {}, _display_path(root / "vmform.toml", root) if root else "vmform.toml",
                       inputs, collector)
    scope.root = root
    for file, document in loaded:
        _load_document(document, file, manifests, collector, scope)
    _run_tasks(scope, collector)
    manifests.variables = dict(scope.values)
    _check_references(manifests, collector)
    if collector.errors:
        raise ManifestErrors(collector.errors)
    for resource in manifests.resources.values():
        resource.desired = resource.kind.bind(resource, manifests.in_scope(resource.module))
        _check_extra_xml(resource, collector)
    for domain, relative, message in add_reservations(manifests):
        collector.add(message, domain.position(*relative))
    for resource in manifests.resources.values():
        _check_stylesheet(resource, collector)
    roots = (*optins.DEFAULT_POOL_ROOTS, *extra_pool_roots(dict(settings or {})))
    for message, position in optins.check(manifests.resources.values(), roots):
        collector.add(message, position)
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
    """What expressions see: the variables' values (a module's: its inputs), and which of them are sensitive;
    and, inside a module, where it sits."""

    values: dict[str, Any] = field(default_factory=dict)
    sensitive: set[str] = field(default_factory=set)
    # Instances waiting to be evaluated and loaded (references to other resources decide the order).
    tasks: list[Callable[[], None]] = field(default_factory=list)
    declared: set[str] = field(default_factory=set)  # addresses of every instance, loaded or not
    root: Path | None = None  # the project's directory: paths in messages are relative to it
    module: tuple[str, ...] = ()  # the module instance being loaded: ("web",), ('workers["a"]', "disk")
    names: tuple[str, ...] = ()  # what its resources' default libvirt names start with: ("web",), ("workers-a",)
    sources: tuple[Path, ...] = ()  # module directories being loaded, outermost first (none may use itself)
    instance: ModuleInstance | None = None  # where this module's outputs go
    # A module's files and variable declarations, read once however many times it is used.
    modules_read: dict[Path, tuple[list[tuple[Path, YamlDocument]], dict[str, Declaration]]] = \
        field(default_factory=dict)

    def inside(self, instance: ModuleInstance, name: str, directory: Path, values: dict[str, Any],
               sensitive: set[str]) -> _Scope:
        return _Scope(values, sensitive, self.tasks, self.declared, self.root, instance.module, (*self.names, name),
                      (*self.sources, directory), instance, self.modules_read)


def _variables(loaded: list[tuple[Path, YamlDocument]], settings: Mapping[str, Any], project_file: str,
               inputs: VariableInputs | None, collector: _Collector) -> _Scope:
    declarations = _declarations(loaded, settings.get("variables") or {}, project_file, collector)
    project_values = settings.get("vars") or {}
    values, errors = resolve(declarations, project_values if isinstance(project_values, Mapping) else {},
                             project_file, inputs)
    for message, position in errors:
        collector.add(message, position)  # None: set from the command line or the environment
    return _Scope(values, {name for name, d in declarations.items() if d.sensitive})


def _declarations(loaded: list[tuple[Path, YamlDocument]], table: Any, project_file: str,
                  collector: _Collector) -> dict[str, Declaration]:
    """The variables declared in vmform.toml's [variables] table and in the manifests' variables: sections."""
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
    return declarations


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
            _load_outputs(body, source, scope.instance.outputs if scope.instance else manifests.outputs, collector)
            continue
        if section == "modules":
            if body is not None and not isinstance(body, dict):
                collector.add("'modules' must be a mapping of names to {source, inputs}", source.value((section,)))
                continue
            for key, raw in (body or {}).items():
                _expand_module(key, raw, file, source, manifests, collector, scope)
            continue
        kind = SECTIONS.get(section)
        if kind is None:
            hint = did_you_mean(section, [*SECTIONS, *OTHER_SECTIONS])
            collector.add(f"unknown section '{section}'{hint} (sections: {', '.join([*SECTIONS, *OTHER_SECTIONS])})",
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
OTHER_SECTIONS = ("modules", "variables", "outputs")


def _load_outputs(body: Any, source: SourceMap, outputs: dict[str, OutputSpec], collector: _Collector) -> None:
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
        if name in outputs:
            collector.add(f"output '{name}' is declared twice (first at {outputs[name].position})", position)
            continue
        outputs[name] = OutputSpec(name, spec["value"], source.value(("outputs", name)),
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
    for instance_key, default_name, extra in _instances(key, raw, path, source, collector, scope):
        _queue(kind, instance_key, body, default_name, extra, file, source, manifests, collector, scope, path)


def _instances(key: str, raw: dict[Any, Any], path: tuple[str | int, ...], source: SourceMap, collector: _Collector,
               scope: _Scope) -> list[tuple[str, str, dict[str, Any]]]:
    """The instances count or for_each make: (key in addresses, default libvirt name, index or each)."""
    if "count" in raw and "for_each" in raw:
        collector.add(f"{path[-1]} takes count or for_each, not both", source.key((*path, "for_each")))
        return []
    if "count" not in raw and "for_each" not in raw:
        return [(key, key, {})]
    repeat_key = "count" if "count" in raw else "for_each"
    repeat, errors = evaluate_tree(raw[repeat_key], {"var": Recorder(scope.values)}, (*path, repeat_key))
    for where, message in errors:
        collector.add(message, source.value(where))
    if errors:
        return []
    if repeat_key == "count":
        if isinstance(repeat, bool) or not isinstance(repeat, int) or not 0 <= repeat <= MAX_INSTANCES:
            collector.add(f"count must be a whole number from 0 to {MAX_INSTANCES}, got {repeat!r}",
                          source.value((*path, "count")))
            return []
        return [(f"{key}[{number}]", f"{key}-{number}", {"index": number}) for number in range(repeat)]
    if isinstance(repeat, list):
        if not all(isinstance(item, str) for item in repeat) or len(set(repeat)) != len(repeat):
            collector.add("for_each over a list takes distinct strings (use a mapping for anything else)",
                          source.value((*path, "for_each")))
            return []
        items = [(item, item) for item in repeat]
    elif isinstance(repeat, dict):
        items = [(str(each_key), value) for each_key, value in repeat.items()]
    else:
        collector.add(f"for_each takes a mapping or a list of strings, got {repeat!r}", source.value((*path, "for_each")))
        return []
    if len(items) > MAX_INSTANCES:
        collector.add(f"for_each makes more than {MAX_INSTANCES} instances", source.value((*path, "for_each")))
        return []
    instances = []
    for each_key, value in items:
        try:
            NAME.parse(f"{key}-{each_key}")
        except FieldError:
            collector.add(f"for_each key {each_key!r} cannot be part of a libvirt name (letters, digits, _.+-)",
                          source.value((*path, "for_each")))
            return []
        instances.append((f'{key}["{each_key}"]', f"{key}-{each_key}", {"each": {"key": each_key, "value": value}}))
    return instances


MODULE_KEYS = ("source", "inputs", "count", "for_each", "depends_on")
MAX_MODULE_DEPTH = 8


def _expand_module(key: Any, raw: Any, file: Path, source: SourceMap, manifests: Manifests, collector: _Collector,
                   scope: _Scope) -> None:
    """A modules: entry: the module's manifests loaded once per instance, in a scope of their own whose
    variables are the entry's inputs."""
    path: tuple[str | int, ...] = ("modules", key)
    if not isinstance(key, str) or not MODULE_NAME.fullmatch(key):
        collector.add(f"module name {key!r} must be letters, digits, _ and - (starting with a letter)", source.key(path))
        return
    if not isinstance(raw, dict):
        collector.add(f"module '{key}' is a mapping: {{source: DIRECTORY, inputs: {{…}}}}", source.value(path))
        return
    for extra in [k for k in raw if k not in MODULE_KEYS]:
        collector.add(f"module '{key}': unknown key '{extra}'{did_you_mean(str(extra), list(MODULE_KEYS))} "
                      f"({', '.join(MODULE_KEYS)})", source.key((*path, extra)))
    directory = _module_directory(key, raw.get("source"), file, source, path, collector, scope)
    inputs = raw.get("inputs") if raw.get("inputs") is not None else {}
    if not isinstance(inputs, dict):
        collector.add("inputs is a mapping of the module's variable names to values", source.value((*path, "inputs")))
        return
    depends_on = raw.get("depends_on") if raw.get("depends_on") is not None else []
    if not isinstance(depends_on, list) or not all(isinstance(entry, str) for entry in depends_on):
        collector.add("depends_on is a list of addresses (volume.base, module.net)", source.value((*path, "depends_on")))
        return
    if directory is None:
        return
    documents, declarations = _read_module(directory, collector, scope)
    shown = _display_path(directory, scope.root)
    for module_file, _document in documents:
        if _display_path(module_file, scope.root) not in manifests.files:
            manifests.files.append(_display_path(module_file, scope.root))
    for instance_key, name, extra in _instances(key, raw, path, source, collector, scope):
        instance = ModuleInstance((*scope.module, instance_key), shown, source.key(path), depends_on=list(depends_on))
        if instance.address in manifests.modules:
            collector.add(f"{instance.address} is declared twice (first at {manifests.modules[instance.address].position})",
                          source.key(path))
            continue
        manifests.modules[instance.address] = instance
        # Inputs may read other modules' outputs and resources: evaluated, and the module loaded, in turn.
        scope.tasks.append(functools.partial(_load_module, instance, name, directory, inputs, extra, path, source,
                                             manifests, collector, scope))


def _load_module(instance: ModuleInstance, name: str, directory: Path, inputs: dict[Any, Any], extra: dict[str, Any],
                 path: tuple[str | int, ...], source: SourceMap, manifests: Manifests, collector: _Collector,
                 scope: _Scope) -> None:
    documents, declarations = _read_module(directory, collector, scope)
    values: dict[str, Any] = {}
    sensitive = {n for n, d in declarations.items() if d.sensitive}
    evaluated: list[tuple[str, Any, Recorder, list[str]]] = []
    failed = False
    for input_name, value in inputs.items():
        where = (*path, "inputs", input_name)
        recorder = Recorder(scope.values)
        reader = ResourceReader(manifests, scope.declared, instance.address, source.value(where), module=scope.module)
        result, errors = evaluate_tree(value, {"var": recorder, **extra, **reader.namespaces()}, where)
        for at, message in errors:
            collector.add(message, source.value(at))
        failed |= bool(errors)
        evaluated.append((str(input_name), result, recorder, reader.read))
    if failed:
        instance.loaded = instance.failed = True
        return
    before = len(collector.errors)
    for input_name, result, recorder, read in evaluated:
        where = (*path, "inputs", input_name)
        declaration = declarations.get(input_name)
        if declaration is None:
            hint = did_you_mean(input_name, list(declarations))
            takes = f" (it takes {', '.join(declarations)})" if declarations and not hint else ""
            collector.add(f"module {instance.source} has no input '{input_name}'{hint}{takes}", source.key(where))
        elif not type_matches(declaration.type, result):
            collector.add(f"input '{input_name}' must be a {declaration.type}, got {result!r}", source.value(where))
        else:
            values[input_name] = result
            instance.input_reads[input_name] = _reads(read, recorder, scope)
            if recorder.read & scope.sensitive:
                sensitive.add(input_name)  # a secret stays one inside the module
    for variable, declaration in declarations.items():
        if variable not in values and variable not in inputs:
            if declaration.has_default:
                values[variable] = declaration.default
            else:
                collector.add(f"module '{path[-1]}' needs input '{variable}' (declared at {declaration.position})",
                              source.key(path))
    instance.variables = values
    if len(collector.errors) > before:
        instance.loaded = instance.failed = True  # its resources would only repeat the mistake
        return
    inner = scope.inside(instance, name, directory, values, sensitive)
    for module_file, document in documents:
        _load_document(document, module_file, manifests, collector, inner)
    instance.loaded = True


def _reads(read: list[str], recorder: Recorder, scope: _Scope) -> list[str]:
    """The resources an expression depends on: those it read, and those the module inputs it read read."""
    found = list(read)
    if scope.instance is not None:
        for variable in sorted(recorder.read):
            found += [a for a in scope.instance.input_reads.get(variable, []) if a not in found]
    return found


def _module_directory(key: str, where: Any, file: Path, source: SourceMap, path: tuple[str | int, ...],
                      collector: _Collector, scope: _Scope) -> Path | None:
    position = source.value((*path, "source")) if where is not None else source.key(path)
    if not isinstance(where, str) or not where:
        collector.add(f"module '{key}' needs source: the module's directory (relative to this file)", position)
        return None
    if "://" in where or where.startswith("git@"):
        collector.add("a module's source is a local directory (relative to this file); vendor remote modules into "
                      "the repository", position)
        return None
    directory = Path(where) if Path(where).is_absolute() else (file.parent / where).resolve()
    if not directory.is_dir():
        collector.add(f"module source {where} is not a directory (looked at {directory})", position)
        return None
    if directory in scope.sources:
        collector.add(f"module '{key}' uses {where}, which is already being loaded (a module cannot use itself)",
                      position)
        return None
    if len(scope.module) >= MAX_MODULE_DEPTH:
        collector.add(f"modules nest more than {MAX_MODULE_DEPTH} deep", position)
        return None
    if not module_files(directory):
        collector.add(f"module source {where} holds no manifests (*.yaml)", position)
        return None
    return directory


def _read_module(directory: Path, collector: _Collector,
                 scope: _Scope) -> tuple[list[tuple[Path, YamlDocument]], dict[str, Declaration]]:
    """A module's manifests (*.yaml, *.yml, in name order) and the variables they declare: its inputs."""
    if directory in scope.modules_read:
        return scope.modules_read[directory]
    loaded: list[tuple[Path, YamlDocument]] = []
    for file in module_files(directory):
        loaded.extend((file, document) for document in _read_manifest(file, scope.root, collector))
    declarations = _declarations(loaded, {}, "", collector)
    scope.modules_read[directory] = (loaded, declarations)
    return loaded, declarations


def _queue(kind: Kind, key: str, raw: Any, default_name: str | None, extra: dict[str, Any], file: Path,
           source: SourceMap, manifests: Manifests, collector: _Collector, scope: _Scope,
           path: tuple[str | int, ...]) -> None:
    scope.declared.add(scoped_address(scope.module, f"{kind.name}.{key}"))
    scope.tasks.append(lambda: _load_evaluated(kind, key, raw, default_name, extra, file, source, manifests,
                                               collector, scope, path))


def _run_tasks(scope: _Scope, collector: _Collector) -> None:
    """Load every instance (and module), those whose expressions read other resources after those resources.
    Loading a module queues its own resources' tasks."""
    pending = list(scope.tasks)
    scope.tasks.clear()
    while pending:
        waiting = []
        for task in pending:
            try:
                task()
            except NotReady as not_ready:
                waiting.append((task, not_ready))
        if len(waiting) == len(pending) and not scope.tasks:  # no progress: they wait for each other
            for _task, stuck in waiting:
                collector.add(f"{stuck.address}'s values refer to {stuck.wanted}, whose values refer back to it "
                              "(an expression cycle)", stuck.position)
            return
        pending = [task for task, _exc in waiting] + scope.tasks
        scope.tasks.clear()


def _load_evaluated(kind: Kind, key: str, raw: Any, default_name: str | None, extra: dict[str, Any], file: Path,
                    source: SourceMap, manifests: Manifests, collector: _Collector, scope: _Scope,
                    path: tuple[str | int, ...]) -> None:
    address = scoped_address(scope.module, f"{kind.name}.{key}")
    if raw is None and scope.module:
        raw = {}
    if not isinstance(raw, dict):
        _load_resource(kind, key, raw, file, source, manifests, collector, path, scope.module, scope.root)
        return
    evaluated: dict[str, Any] = {}
    failed = False
    references: list[tuple[str, tuple[str | int, ...]]] = []
    for field_name, value in raw.items():
        recorder = Recorder(scope.values)
        reader = ResourceReader(manifests, scope.declared, address, source.value((*path, field_name)),
                                module=scope.module)
        result, errors = evaluate_tree(value, {"var": recorder, **extra, **reader.namespaces()}, (*path, field_name))
        references.extend((read, (field_name,)) for read in _reads(reader.read, recorder, scope))
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
        manifests.invalid.add(address)
        return
    if evaluated.get("name") is None:
        if scope.names and evaluated.get("existing") is not True:
            # Two uses of one module must not fight over a libvirt name: web-vm, db-vm, workers-a-vm.
            evaluated["name"] = "-".join((*scope.names, default_name or key))
        elif default_name is not None and not scope.names:
            evaluated["name"] = default_name
    _load_resource(kind, key, evaluated, file, source, manifests, collector, path, scope.module, scope.root)
    loaded = manifests.resources.get(address)
    if loaded is not None:
        loaded.references = references


def _load_resource(
    kind: Kind, key: str, raw: Any, file: Path, source: SourceMap, manifests: Manifests, collector: _Collector,
    path: tuple[str | int, ...], module: tuple[str, ...] = (), root: Path | None = None,
) -> None:
    address = scoped_address(module, f"{kind.name}.{key}")
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
            manifests.invalid.add(address)
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
            manifests.invalid.add(address)
            return
        resource = Resource(kind, key, values, source, path, host=_host(values, manifests, source, path, collector),
                            module=module)
        if resource.address not in manifests.resources:
            manifests.resources[resource.address] = resource
        return
    try:
        values = parse_fields(kind.all_fields, raw)
    except FieldError as exc:
        collector.field_errors(exc, source, path)
        manifests.invalid.add(address)  # declared, though wrong: references to it are fine
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
        outside = _outside_project(sheet_path, file, root, values)
        if outside:
            collector.add(f"the stylesheet {stylesheet[len('file:'):]!r} {outside}", source.value((*path, "xslt")))
            values["xslt"] = None
            stylesheet = None
    if isinstance(stylesheet, str) and stylesheet.startswith("file:"):
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
        outside = _outside_project(image, file, root, values)
        try:
            found = None if outside else image.is_file()
        except OSError as exc:  # a name too long for the filesystem, …
            collector.add(f"source image {values['source'][:80]!r}: {exc.strerror}", source.value((*path, "source")))
            found = None
        if outside:
            collector.add(f"source image {values['source'][:200]!r} {outside}", source.value((*path, "source")))
        elif found is False:
            collector.add(f"source image {values['source']} not found (looked at {image})", source.value((*path, "source")))
        elif found and values.get("sha256") and file_digest(image) != values["sha256"].lower():
            collector.add(f"source image {values['source']} has sha256 {file_digest(image)}, not the {values['sha256']} "
                          "the manifest expects", source.value((*path, "sha256")))
        values["source"] = str(image)
    if kind.name == "cloudinit":
        _read_seed_files(values, file, source, path, collector, root)
    resource = Resource(kind, key, values, source, path, host=_host(values, manifests, source, path, collector),
                        module=module)
    _check_foreign_xml(resource, collector)
    existing = manifests.resources.get(resource.address)
    if existing is not None:
        first = existing.key_position()
        collector.add(f"{resource.address} is declared twice (first at {first})", source.key(path))
        return
    manifests.resources[resource.address] = resource


def _host(values: dict[str, Any], manifests: Manifests, source: SourceMap, path: tuple[str | int, ...],
          collector: _Collector) -> str:
    host = values.get("host") or manifests.default_host
    if host not in manifests.hosts:
        known = ", ".join(manifests.hosts)
        collector.add(f"no host '{host}' in vmform.toml's [hosts]{did_you_mean(host, manifests.hosts)} (hosts: {known})",
                      source.value((*path, "host")))
    return str(host)


MAX_SEED_FILE_BYTES = 1024 * 1024


def _outside_project(target: Path, manifest: Path, root: Path | None, values: dict[str, Any]) -> str:
    """Why a local file a manifest reads (a source image, a seed file, a stylesheet) may not be read, or "".

    Whatever is read ends up on the host or in a guest, and manifests may come from anyone with a pull request:
    the file must be inside the project directory (or the module directory whose manifest names it), after
    symlinks and '..' are resolved, unless the resource says allow: [host_paths]."""
    if "host_paths" in (values.get("allow") or []):
        return ""
    try:
        real = target.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return "cannot be resolved to a file; refused"
    bases = [base.resolve() for base in (root, manifest.parent) if base is not None]
    if any(real == base or base in real.parents for base in bases):
        return ""
    return ("is outside the project directory (after resolving symlinks and '..'); refused unless the resource "
            "says allow: [host_paths]")


def _read_seed_files(values: dict[str, Any], file: Path, source: SourceMap, path: tuple[str | int, ...],
                     collector: _Collector, root: Path | None = None) -> None:
    """``{file: PATH}`` in a cloud-init seed: the file's text, read relative to the manifest (inside the project)."""
    for name in ("user_data", "network_config"):
        value = values.get(name)
        if not isinstance(value, dict):
            continue
        target = Path(value["file"])
        if not target.is_absolute():
            target = (file.parent / target).resolve()
        position = source.value((*path, name, "file"))
        outside = _outside_project(target, file, root, values)
        if outside:
            collector.add(f"{name} file {str(value['file'])[:200]!r} {outside}", position)
            continue
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
    names: dict[tuple[str, str, str], str] = {}
    for resource in manifests.resources.values():
        for relative, kind, name in field_references(resource.kind.fields, resource.values):
            used = manifests.resolve(kind, name, resource.module)
            if used is None and not manifests.declared_invalid(kind, name, resource.module):
                hint = did_you_mean(name, manifests.visible(kind, resource.module))
                collector.add(f"{resource.address} refers to {kind} '{name}', which is not declared{hint}",
                              resource.position(*relative))
            elif used is not None and used.host != resource.host:
                collector.add(f"{resource.address} is on host {resource.host} but uses {used.address}, which is on "
                              f"host {used.host}: what a resource uses must be on its host", resource.position(*relative))
        for number, address in enumerate(resource.depends_on):
            if not manifests.dependency_targets(address, resource.module) and \
                    scoped_address(resource.module, address) not in manifests.invalid:
                hint = did_you_mean(address, list(manifests.resources))
                collector.add(f"depends_on: no resource '{address}'{hint}", resource.position("depends_on", number))
        # Two resources of a kind may not share a libvirt object (volumes: within their pool).
        pool = manifests.resolve("pool", resource.values.get("pool", ""), resource.module) \
            if resource.kind.name == "volume" else None
        scope = (pool.libvirt_name if pool else resource.values.get("pool", "")) if resource.kind.name == "volume" else ""
        identity = (resource.host, resource.kind.name, f"{scope}/{resource.libvirt_name}")
        if identity in names:
            collector.add(f"{resource.address} has the same libvirt name '{resource.libvirt_name}' as {names[identity]}",
                          resource.key_position())
        else:
            names[identity] = resource.address
    for instance in manifests.modules.values():
        for address in instance.depends_on:
            if not manifests.dependency_targets(address, instance.module[:-1]):
                hint = did_you_mean(address, list(manifests.resources))
                collector.add(f"{instance.address}: depends_on: no resource '{address}'{hint}", instance.position)

