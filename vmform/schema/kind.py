"""What every resource kind declares: its manifest section, its fields, and how references bind."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vmform.schema.types import NAME, Bool, Enum, FieldSpec, ListOf, Obj, Ref, Str, ValueType


@dataclass(frozen=True)
class Repetition(ValueType):
    """count / for_each: read and expanded by the loader before the fields are parsed."""

    description: str

    def parse(self, raw: Any) -> Any:
        return raw

    def describe(self) -> str:
        return self.description


# What an `existing: true` resource may say, by kind (it is only used, never configured).
EXISTING_KEYS = {
    "network": ("name", "existing", "depends_on", "host"),
    "pool": ("name", "existing", "depends_on", "host"),
    "volume": ("name", "existing", "depends_on", "pool", "format", "host"),
}

# Opt-ins a resource can state with allow: (plans list them in bold), and what each lets it do.
OPT_IN_DOCS = {
    "foreign_xml": "XML outside libvirt's namespace in xml: or xslt:, e.g. qemu:commandline or dnsmasq:options; it "
                   "can make QEMU or dnsmasq do anything",
    "host_paths": "disks, filesystems, kernel/initrd and character-device files on host paths outside the pools "
                  "this project manages, and host block devices (/dev/…)",
    "host_devices": "host device passthrough: hostdevs (PCI), hostdev elements in xml:, interface type hostdev, "
                    "evdev input, TPM or smartcard passthrough, NVMe disks, a network's forward mode hostdev",
    "custom_emulator": "an emulator element in xml: or xslt: (the program libvirt runs as the hypervisor)",
}
OPT_INS = tuple(OPT_IN_DOCS)

# Keys every resource accepts besides its kind's fields.
LIFECYCLE = Obj((
    FieldSpec("prevent_destroy", Bool(), "a plan that would delete or replace this resource is an error", default=False,
              compare=False),
    FieldSpec("ignore_changes", ListOf(Str()), "fields whose drift on the host is not corrected", default=[],
              compare=False),
    FieldSpec("create_before_destroy", Bool(),
              "on replace, create the new object first (it needs a different name or pool)", default=False,
              compare=False),
    FieldSpec("allow_data_loss", Bool(), "allow a replace that discards this volume's contents", default=False,
              compare=False),
))

META_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("name", NAME, "the libvirt object name (default: the manifest key)", compare=False),
    FieldSpec("host", Str(pattern=r"[A-Za-z][A-Za-z0-9_-]{0,62}", hint="a host name from vmform.toml's [hosts]"),
              "the host it lives on, a name from vmform.toml's [hosts] (default: project.default_host); changing a "
              "domain's host migrates it", compare=False),
    FieldSpec("depends_on", ListOf(Str()), "addresses this resource waits for, e.g. [network.lan]", compare=False),
    FieldSpec("existing", Bool(), "an object vmform did not create (the host's default network or pool, a "
              "volume someone uploaded): only read and used, never changed or deleted; the plan fails if it is "
              "missing. Networks, pools and volumes (with pool and format)", default=False, compare=False),
    FieldSpec("lifecycle", LIFECYCLE, "how vmform may change this resource", compare=False),
    FieldSpec("allow", ListOf(Enum(OPT_INS)),
              "what this resource may do that vmform refuses by default, each named explicitly (every plan shows "
              "it in bold): " + "; ".join(f"{name} ({doc})" for name, doc in OPT_IN_DOCS.items()), default=[],
              compare=False),
    FieldSpec("count", Repetition("a whole number (or an expression giving one)"),
              "make N instances: kind.NAME[0] … kind.NAME[N-1], libvirt names NAME-0 …; index in expressions",
              compare=False),
    FieldSpec("for_each", Repetition("a mapping, or a list of strings"),
              "one instance per key: kind.NAME[\"key\"], libvirt name NAME-key; each.key and each.value in "
              "expressions", compare=False),
    FieldSpec("restart_policy", Enum(("never", "allowed")),
              "may apply restart this domain or network to make restart-class changes take effect "
              "(apply --restart allows it for every resource)", default="never", compare=False),
)


def _own_fields(resource: Any) -> dict[str, Any]:
    """The desired values of a kind without references to bind: its own fields, without the meta keys."""
    names = {spec.name for spec in resource.kind.fields}
    return {key: value for key, value in resource.values.items() if key in names}


@dataclass(frozen=True)
class Kind:
    name: str  # "domain"
    section: str  # "domains"
    fields: tuple[FieldSpec, ...]
    doc: str
    # Resolve references (manifest names) into libvirt terms and fill derived defaults.
    bind: Callable[[Any, Any], dict[str, Any]] = field(default=lambda resource, index: _own_fields(resource))
    # Extra checks across fields: yields (relative path, message).
    check: Callable[[dict[str, Any]], Iterator[tuple[tuple[str | int, ...], str]]] | None = None
    # The desired values for an existing object (resource, its LiveObject): pinned defaults it was created with.
    settle: Callable[[Any, Any], dict[str, Any]] | None = None

    @property
    def all_fields(self) -> tuple[FieldSpec, ...]:
        return self.fields + META_FIELDS

    def spec(self, name: str) -> FieldSpec | None:
        for spec in self.fields:
            if spec.name == name:
                return spec
        return None


def references(value_type: ValueType, value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], str, str]]:
    """Every (path, kind, name) reference inside a parsed value, found from its declared type."""
    if value is None:
        return
    if isinstance(value_type, Ref):
        yield path, value_type.kind, value
    elif isinstance(value_type, ListOf):
        for index, item in enumerate(value):
            yield from references(value_type.item, item, (*path, index))
    elif isinstance(value_type, Obj):
        for spec in value_type.fields:
            if spec.name in value:
                yield from references(spec.type, value[spec.name], (*path, spec.name))


def field_references(fields: tuple[FieldSpec, ...], values: dict[str, Any]) -> Iterator[tuple[tuple[str | int, ...], str, str]]:
    for spec in fields:
        if spec.name in values:
            yield from references(spec.type, values[spec.name], (spec.name,))
