"""Random manifests over every kind and every field the declarations have (vmform/schema/*), generated from
the field types themselves: well-formed values, values just outside their range, wrong types, and random or
hostile text in every string field. For each one vmform either

* fails with ManifestErrors, every one at a file:line of the manifest (never another exception), or
* plans it (against an empty host; a plan may refuse, with a PlanError, e.g. an ``existing:`` object that is
  not there) and renders every resource to XML that libvirt's RelaxNG schema accepts, whose structure no
  free-text value changes: the same manifest with each free-text value replaced by a plain word renders
  the same elements and attributes.

Deterministic (derandomized) and bounded: a few hundred examples, well under a minute.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from lxml import etree
from test_hostile_strings import HOSTILE as FIELD_HOSTILE

from vmform import api
from vmform.diff import PlanOptions, make_plan
from vmform.errors import ManifestErrors, PlanError, PlanErrors
from vmform.live import LiveState
from vmform.manifest.variables import VariableInputs
from vmform.ownership import Ledger
from vmform.render.validate import schemas_available, validate
from vmform.schema.domain import ConsoleLogType, IgnitionText
from vmform.schema.extra_xml import ExtraXml
from vmform.schema.kind import META_FIELDS, OPT_INS, Repetition
from vmform.schema.registry import KINDS
from vmform.schema.types import (
    Bool,
    Enum,
    FieldSpec,
    Int,
    IPv4Address,
    IPv4Interface,
    ListOf,
    Mac,
    Obj,
    Ref,
    Size,
    Str,
    ValueType,
)
from vmform.schema.xslt import Stylesheet

PROJECT = "random"
# No shrinking: a failure prints the manifest it drew, and the suite stays within its time budget.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate)
KEYS = ("a", "b")  # every kind's resources are named from these, so references often resolve

pytestmark = pytest.mark.skipif(not schemas_available(), reason="libvirt's RNG schemas are not installed")

# The hostile strings of the per-field test (test_hostile_strings.py), plus values that look like other things.
HOSTILE = st.one_of(
    FIELD_HOSTILE,
    st.sampled_from(["{{ var.nope }}", "{% if %}", "\x00", "\x1b[31m", "$(reboot)", "/dev/sda", "/", "", "-1", "0x10",
                     "yes", "null", "~"]),
)
SIZES = st.one_of(st.sampled_from(["64MiB", "1GiB", "128MiB", "1.5GiB", "2GB", "16KiB", "0", "-1MiB", "1 GiB", "1TiB",
                                   "99999999999TiB", "MiB"]), st.integers(-1, 2**40))
MACS = st.one_of(st.sampled_from(["52:54:00:aa:bb:cc", "52:54:00:AA:00:01", "ff:ff:ff:ff:ff:ff", "52-54-00-aa-bb-cc"]),
                 HOSTILE)
ADDRESSES = st.one_of(st.sampled_from(["10.9.0.1", "10.9.0.50", "10.9.0.200", "192.168.1.1", "256.1.1.1", "10.9.0",
                                       "::1"]), HOSTILE)
INTERFACES = st.one_of(st.sampled_from(["10.9.0.1/24", "10.8.0.1/16", "10.9.0.1", "10.9.0.0/24", "10.9.0.1/33"]),
                       HOSTILE)
EXTRA_XML = {
    "domain": [{"on_crash": "restart"}, {"devices": {"watchdog": {"model": "i6300esb", "action": "reset"}}},
               {"title": "t"}, {"clock": {"offset": "utc"}}, {"devices": {"emulator": "/usr/bin/qemu-system-x86_64"}},
               {"devices": {"hostdev": [{"mode": "subsystem", "type": "pci", "source": {"address": {
                   "domain": "0x0000", "bus": "0x01", "slot": "0x00", "function": "0x0"}}}]}},
               {"nosuch": 1}, {"name": "x"}, "text"],
    "network": [{"mtu": {"size": 1400}}, {"dns": {"enable": "no"}}, {"forward": {"mode": "hostdev"}}, {"nosuch": 1}],
    "pool": [{"target": {"permissions": {"mode": "0755"}}}, {"nosuch": 1}],
}
# Text that is well-formed for XML (no control characters) but otherwise anything: free text must load.
TEXT = st.one_of(
    st.sampled_from(["a'/><qemu:commandline>", "]]><x/>", "<!--", "&amp;&lt;", "\"'><b>", "%s%n", "a\nb", " lead",
                     "ü中\u202e", "x" * 300, "$(reboot)", "/dev/sda", "", "yes", "null", "~", "{{ '{{' }}"]),
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30),
)
STYLESHEET = ('<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">'
              '<xsl:template match="@*|node()"><xsl:copy><xsl:apply-templates select="@*|node()"/></xsl:copy>'
              '</xsl:template></xsl:stylesheet>')


def _either(draw: Any, usual: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], odds: int) -> Any:
    """A draw from ``rare`` once in ``odds`` (never when odds is 0), else from ``usual``."""
    return draw(rare) if odds and draw(st.integers(1, odds)) == 1 else draw(usual)


@st.composite
def _one_in(draw: Any, usual: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], odds: int) -> Any:
    return _either(draw, usual, rare, odds)


_CACHE: dict[tuple[Any, ...], st.SearchStrategy[Any]] = {}  # strategies are built once per declared type


def _cached(key: tuple[Any, ...], build: Any) -> st.SearchStrategy[Any]:
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def _pattern_text(spec_type: Str, odds: int) -> st.SearchStrategy[str]:
    if spec_type.pattern is None:
        return HOSTILE if odds else TEXT  # free text: anything goes (and must stay text)
    try:
        matching = st.from_regex(re.compile(spec_type.pattern), fullmatch=True).filter(lambda s: len(s) < 200)
    except Exception:  # noqa: BLE001 - a pattern hypothesis cannot generate from (lookarounds)
        return HOSTILE
    if not odds:
        return matching.filter(lambda s: not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in s))
    return _one_in(matching, HOSTILE, odds)


def values_of(value_type: ValueType, kind: str, depth: int = 0, odds: int = 3) -> st.SearchStrategy[Any]:
    """Values for one declared type: well-formed, except once in ``odds`` draws (never with 0) out of range
    or of the wrong type."""
    return _cached((id(value_type), kind, depth, odds), lambda: _values_of(value_type, kind, depth, odds))


def _values_of(value_type: ValueType, kind: str, depth: int, odds: int) -> st.SearchStrategy[Any]:
    wrong = st.one_of(st.integers(-3, 3), st.booleans(), st.none(), st.just([]), st.just({}), HOSTILE)
    right: st.SearchStrategy[Any]
    if isinstance(value_type, Str):
        right = _pattern_text(value_type, odds)
    elif isinstance(value_type, Int):
        low = (value_type.minimum or 0) - (1 if odds else 0)
        high = min((value_type.maximum or 10) + (1 if odds else 0), 100000)
        right = st.integers(low, high)
    elif isinstance(value_type, Bool):
        right = st.booleans()
    elif isinstance(value_type, Enum):
        right = st.sampled_from(value_type.choices)
    elif isinstance(value_type, Size):
        right = SIZES if odds else st.sampled_from(["64MiB", "128MiB", "1GiB"])
    elif isinstance(value_type, Mac):
        right = MACS if odds else st.sampled_from(["52:54:00:aa:bb:cc", "52:54:00:AA:00:01", "52:54:00:00:00:02"])
    elif isinstance(value_type, IPv4Address):
        right = ADDRESSES if odds else st.sampled_from(["10.9.0.1", "10.9.0.50", "10.9.0.200", "10.9.0.77"])
    elif isinstance(value_type, IPv4Interface):
        right = INTERFACES if odds else st.sampled_from(["10.9.0.1/24", "10.9.0.1/16"])
    elif isinstance(value_type, Ref):
        right = st.just("a") if not odds else st.one_of(st.sampled_from(KEYS), st.sampled_from(["c", "a b"]))
    elif isinstance(value_type, ListOf):
        right = st.lists(values_of(value_type.item, kind, depth + 1, odds), max_size=3)
    elif isinstance(value_type, Obj):
        right = objects(value_type.fields, kind, depth + 1, odds)
        short = next((f for f in value_type.fields if f.name == value_type.shorthand), None)
        if short is not None and (odds or isinstance(short.type, Ref)):
            right = st.one_of(right, st.sampled_from(KEYS))
    elif isinstance(value_type, ExtraXml):
        choices = EXTRA_XML.get(value_type.kind, [{}])
        right = st.sampled_from(choices if odds else [c for c in choices if isinstance(c, dict) and "nosuch" not in c
                                                      and "name" not in c])
    elif isinstance(value_type, Stylesheet):
        right = st.sampled_from([STYLESHEET, "<xsl:stylesheet/>", "not xml"] if odds else [STYLESHEET])
    elif isinstance(value_type, IgnitionText):
        right = st.one_of(st.just({"ignition": {"version": "3.4.0"}}), HOSTILE if odds else st.just('{"a": "<b/>"}'))
    elif isinstance(value_type, ConsoleLogType):
        paths = st.sampled_from(["/var/log/libvirt/qemu/x.log", "/etc/passwd"])
        right = st.one_of(st.booleans(), paths, HOSTILE) if odds else st.one_of(st.booleans(), paths)
    elif isinstance(value_type, Repetition):
        right = st.one_of(st.integers(0, 2), st.lists(st.sampled_from(["x", "y"]), max_size=2, unique=True))
    elif type(value_type).__name__ in ("CloudConfig", "MetaData"):
        mapping = st.dictionaries(st.sampled_from(["local-hostname", "instance-id", "packages"]),
                                  HOSTILE if odds else TEXT, max_size=2)
        right = st.one_of(mapping, HOSTILE) if odds else mapping
    else:  # a type this test does not know yet: its wrong values still exercise the error path
        right = wrong
    return _one_in(right, wrong, odds)


def objects(fields: tuple[FieldSpec, ...], kind: str, depth: int = 0, odds: int = 3) -> st.SearchStrategy[dict[str, Any]]:
    """A mapping of a random subset of fields (required ones present but once in ``odds``), once in 20 an
    unknown key (never when odds is 0)."""
    return _cached((id(fields), kind, depth, odds), lambda: _objects(fields, kind, depth, odds))


def _objects(fields: tuple[FieldSpec, ...], kind: str, depth: int, odds: int) -> st.SearchStrategy[dict[str, Any]]:
    if depth > 2:
        return st.just({})
    entries = {spec.name: values_of(spec.type, kind, depth, odds) for spec in fields}

    @st.composite
    def build(draw: Any) -> dict[str, Any]:
        chosen = {}
        for spec in fields:
            keep = draw(st.integers(0, 9))
            if (spec.required and (not odds or draw(st.integers(1, odds)) > 1)) or keep < 3:
                chosen[spec.name] = draw(entries[spec.name])
        if odds and draw(st.integers(0, 19)) == 0:
            chosen["unknownkey"] = 1
        return chosen

    return build()


META = tuple(spec for spec in META_FIELDS if spec.name not in ("count", "for_each", "existing"))


@st.composite
def manifests(draw: Any, odds: int = 3) -> dict[str, Any]:
    """A manifest with every kind's resources named from KEYS; ``odds``: see values_of (0: only well-typed
    values, and always a pool, volume and network 'a' to refer to)."""
    data: dict[str, Any] = {}
    for kind in KINDS.values():
        section: dict[str, Any] = {}
        keys = draw(st.lists(st.sampled_from(KEYS), max_size=2, unique=True))
        if not odds and kind.name in ("pool", "volume", "network", "cloudinit") and "a" not in keys:
            keys.insert(0, "a")  # something to refer to
        for key in keys:
            body = draw(objects(kind.fields, kind.name, odds=odds))
            body.update(draw(objects(META, kind.name, depth=1, odds=odds)))
            if not odds:
                body.pop("depends_on", None)
                for name in ("source", "sha256") if kind.name == "volume" else ():
                    body.pop(name, None)  # a source image must exist: tests/unit/test_loader.py covers it
                if isinstance(body.get("lifecycle"), dict):
                    body["lifecycle"].pop("ignore_changes", None)
                if kind.name == "pool":
                    body["path"] = f"/var/lib/vmform/{key}"
                    if body.get("type") not in (None, "dir", "mpath"):
                        body["type"] = "dir"  # the others need a source: regression_pool_types_need_a_source.yaml
                if kind.name == "volume" and key == "a":
                    body.pop("backing", None)  # volume.a is what the others refer to
                if isinstance(body.get("xml"), dict) and set(body["xml"]) & set(body):
                    body.pop("xml")  # a curated field and the xml: section may not both say one thing
                if kind.name == "domain":
                    _domain_fixups(body)
                if kind.name == "network":
                    if body.get("mode") == "bridge":
                        for name in ("ipv4", "domain", "dhcp", "dhcp_hosts", "dns_hosts"):
                            body.pop(name, None)
                        body.setdefault("bridge", "br0")
                    else:
                        body.setdefault("ipv4", "10.9.0.1/24")
                        if "dhcp" in body:
                            body["dhcp"] = {"start": "10.9.0.100", "end": "10.9.0.200"}
                        for name in ("dhcp_hosts", "dns_hosts"):
                            if isinstance(body.get(name), list):
                                body[name] = body[name][:1]
                if kind.name == "volume" and body.get("backing"):
                    body.pop("preallocation", None)
                    body["format"] = "qcow2"
                body.pop("name", None)
            if draw(st.integers(0, 3)) == 0:
                body["allow"] = list(OPT_INS)
            if draw(st.integers(0, 14)) == 0 and (odds or kind.name in ("domain", "cloudinit")):
                body["count"] = draw(st.integers(0, 2))
            section[key] = body
        if section:
            data[kind.section] = section
    return data


def _domain_fixups(body: dict[str, Any]) -> None:
    """The cross-field rules of a domain (schema/domain.py check), so most well-typed domains load."""
    if "kernel" not in body:
        body.pop("initrd", None)
        body.pop("cmdline", None)
    if body.get("serial_console") is False:
        body.pop("console_log", None)
    if body.get("secure_boot"):
        body["firmware"] = "efi"
    cpu = body.get("cpu")
    if isinstance(cpu, dict) and (cpu.get("mode") == "custom") != bool(cpu.get("model")):
        body["cpu"] = {"mode": "custom", "model": "qemu64"}
    body.pop("max_memory", None)
    body.pop("max_vcpus", None)
    disks = []
    for disk in body.get("disks") or []:
        if isinstance(disk, dict):
            disk = dict(disk)
            if disk.get("path") is not None:
                disk.pop("volume", None)
                disk.setdefault("format", "raw")
            else:
                disk.pop("format", None)
                if disk.get("device") != "cdrom":
                    disk["volume"] = "a"
            disk.pop("target", None)
        disks.append(disk)
    if "disks" in body:
        body["disks"] = disks
    body.pop("interfaces", None) if any(isinstance(nic, dict) and nic.get("ip") for nic in
                                        body.get("interfaces") or []) else None


def free_text_plain(value_type: ValueType, value: Any) -> Any:
    """value with every free-text string (a Str without pattern) replaced by a plain word."""
    if isinstance(value_type, Str) and value_type.pattern is None and isinstance(value, str):
        return "plain"
    if isinstance(value_type, ListOf) and isinstance(value, list):
        return [free_text_plain(value_type.item, item) for item in value]
    if isinstance(value_type, Obj) and isinstance(value, dict):
        specs = {spec.name: spec for spec in value_type.fields}
        return {k: free_text_plain(specs[k].type, v) if k in specs else v for k, v in value.items()}
    return value


def plain_twin(data: dict[str, Any]) -> dict[str, Any]:
    twin: dict[str, Any] = {}
    for section, body in data.items():
        kind = next(k for k in KINDS.values() if k.section == section)
        twin[section] = {key: free_text_plain(Obj(kind.all_fields), value) for key, value in body.items()}
    return twin


def structure(root: Any) -> list[str]:
    """Element paths and attribute names: what a value must never add to."""
    tree = etree.ElementTree(root)
    found = []
    for node in root.iter():
        if isinstance(node.tag, str):
            path = tree.getpath(node)
            found.append(path)
            found.extend(f"{path}/@{name}" for name in node.attrib)
    return sorted(found)


def workspace(directory: Path, data: dict[str, Any]) -> Any:
    """The project as the CLI loads it (manifests, references, cycles), against test:///default."""
    (directory / "vmform.toml").write_text(f'[project]\nname = "{PROJECT}"\nuri = "test:///default"\n'
                                           'manifests = ["*.yaml"]\n', encoding="utf-8")
    (directory / "m.yaml").write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return api.load_workspace(directory, VariableInputs(environ={}))


def rendered(loaded: Any) -> dict[str, Any]:
    """Every resource's XML, validated against libvirt's schemas as the CLI's validate does (an
    InvalidXMLError here is a bug this test exists to find)."""
    roots = {}
    for address, resource in loaded.manifests.resources.items():
        if not resource.values.get("existing"):  # as api.validate: only used, never written
            roots[address] = api.render(loaded, resource)
            validate(resource.kind.name, roots[address], address)
    return roots


def check_manifest(data: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        try:
            loaded = workspace(directory, data)
        except ManifestErrors as exc:
            assert exc.errors
            for error in exc.errors:
                assert error.position is not None, error
                assert error.position.file == "m.yaml" and error.position.line >= 1, error
                assert error.message.strip() and "Traceback" not in error.message, error
            return
        roots = rendered(loaded)
        # test:///default has no secret driver (the ledger): plan against an empty host as api.plan would.
        live = LiveState("test:///default", [], Ledger(PROJECT))
        options = PlanOptions(protected=frozenset(a for a, r in loaded.manifests.resources.items()
                                                  if r.lifecycle.get("prevent_destroy")))
        try:
            plan = make_plan(loaded.manifests, loaded.graph, live, loaded.order, options)
            assert not plan.empty or not roots
            assert set(plan.allowed) == {a for a, r in loaded.manifests.resources.items() if r.values.get("allow")}
        except PlanErrors as exc:
            assert exc.errors and all(isinstance(error, PlanError) and error.message for error in exc.errors)
        plain = plain_twin(data)
        if plain == data:
            return  # no free text to compare with
        try:
            twin = rendered(workspace(directory, plain))
        except ManifestErrors:
            return  # the plain word is not valid where the value was (a semantic check): nothing to compare
        for address, root in roots.items():
            assert not root.findall(".//{http://libvirt.org/schemas/domain/qemu/1.0}commandline"), address
            if address in twin:
                assert structure(root) == structure(twin[address]), address


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), phases=PHASES)
@given(data=manifests(odds=3))
def test_random_manifests_plan_or_fail_cleanly(data: dict[str, Any]) -> None:
    """Anything at all: wrong types, missing and unknown keys, values out of range."""
    check_manifest(data)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), phases=PHASES)
@given(data=manifests(odds=0))
def test_random_well_typed_manifests_plan_or_fail_cleanly(data: dict[str, Any]) -> None:
    """Well-typed values (so most manifests load, plan and render), random and hostile text in free text."""
    check_manifest(data)


def test_generator_reaches_every_declared_field() -> None:
    """Every field of every kind has a strategy of its own (not only the wrong-type fallback)."""
    unknown = []
    for kind in KINDS.values():
        for spec in (*kind.fields, *META_FIELDS):
            inner = spec.type.item if isinstance(spec.type, ListOf) else spec.type
            known = (Str, Int, Bool, Enum, Size, Mac, IPv4Address, IPv4Interface, Ref, ListOf, Obj, ExtraXml,
                     Stylesheet, IgnitionText, ConsoleLogType, Repetition)
            if not isinstance(inner, known) and type(inner).__name__ not in ("CloudConfig", "MetaData"):
                unknown.append(f"{kind.name}.{spec.name}: {type(inner).__name__}")
    assert not unknown, unknown
