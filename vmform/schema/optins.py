"""What a resource may only do when its manifest opts in with ``allow:``: host paths outside the project's
pools and host block devices (``host_paths``), host device passthrough (``host_devices``) and a custom
``<emulator>`` (``custom_emulator``). ``foreign_xml`` is checked by the loader itself.

The checks look at the XML vmform would send, so every route is covered: the curated fields, the ``xml:``
section and an ``xslt:`` stylesheet. Each document is rendered three times (curated fields only, with the
``xml:`` section, with the stylesheet); a finding is reported at the first stage that produces it, which
names the manifest line responsible for it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from vmform.errors import Position
from vmform.schema.xmlbind import Element

HOST_PATHS = "host_paths"
HOST_DEVICES = "host_devices"
CUSTOM_EMULATOR = "custom_emulator"

WHY = {
    HOST_PATHS: "",
    HOST_DEVICES: " (host device passthrough gives the guest the host's hardware)",
    CUSTOM_EMULATOR: " (a custom emulator: a program libvirt runs as the hypervisor)",
}

# Where pools may be made without allow: [host_paths]; vmform.toml's pool_roots adds to these.
DEFAULT_POOL_ROOTS = ("/var/lib/libvirt/images", "/var/lib/vmform")
# Never a pool directory, with or without an opt-in: the host's own files live there. A pool at one of them, inside
# one, or at a directory holding one (/, /var) would make them volumes a guest can be given.
SYSTEM_DIRECTORIES = ("/etc", "/usr", "/boot", "/root", "/proc", "/sys", "/dev", "/run", "/bin", "/sbin", "/lib",
                      "/lib32", "/lib64", "/libx32", "/var/run", "/var/log", "/var/lib/libvirt")
SYSTEM_EXCEPTIONS = ("/var/lib/libvirt/images",)  # libvirt's own default pool, inside /var/lib/libvirt


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def system_directory(path: str) -> str:
    """Why ``path`` (normalised, absolute) may never be a pool directory, or ""."""
    if any(_under(path, allowed) for allowed in SYSTEM_EXCEPTIONS):
        return ""
    for system in SYSTEM_DIRECTORIES:
        if _under(path, system):
            return f"is inside the system directory {system}"
        if _under(system, path):
            return f"holds the system directory {system}"
    return ""


# Where libvirt writes console logs by itself (console_log: true): not a host path the manifest chose.
CONSOLE_LOG_DIR = "/var/log/libvirt/qemu/"

_CHAR_DEVICES = ("serial", "console", "parallel", "channel")
_PATH_CHAR_TYPES = ("file", "dev", "pipe", "unix")


@dataclass(frozen=True)
class Finding:
    opt_in: str
    what: str  # "disk vdb: /dev/sdb is a host block device"
    field: tuple[str | int, ...] = ()  # the curated field that writes it, when one does (disks, vdb)


@dataclass(frozen=True)
class Scope:
    """What the project manages: its pools' directories (declared, not existing) and every declared pool's
    libvirt name (a volume disk in one of those is a reference the manifests make)."""

    directories: tuple[str, ...]
    pools: frozenset[str]
    # The files in those directories that are declared volumes (and seeds): a path there is one of the project's
    # own volumes, or it is refused like any other host path. None: any file in the directories (import).
    volumes: frozenset[str] | None = None
    roots: tuple[str, ...] = DEFAULT_POOL_ROOTS  # where pools may be made without allow: [host_paths]

    def inside(self, path: str) -> bool:
        normal = os.path.normpath(path)
        if not normal.startswith("/") or "\x00" in normal:
            return False
        if not any(normal != directory and os.path.commonpath([normal, directory]) == directory
                   for directory in self.directories):
            return False
        return self.volumes is None or normal in self.volumes

    def why_outside(self, path: str) -> str:
        """The end of a refusal: outside the pools, or in a pool directory but not one of its volumes."""
        normal = os.path.normpath(path)
        in_pool = any(normal != d and os.path.commonpath([normal, d]) == d for d in self.directories
                      if normal.startswith("/"))
        if in_pool:
            return "is in a managed pool's directory but is not one of the volumes the manifests declare there"
        return "is outside the pools this project manages"

    def in_roots(self, path: str) -> bool:
        return any(_under(os.path.normpath(path), root) for root in self.roots)


def scope_of(resources: Iterable[Any], roots: tuple[str, ...] = DEFAULT_POOL_ROOTS, volumes: bool = True) -> Scope:
    """``volumes``: a path in a pool directory must be a declared volume's (False: any file there, for import)."""
    from vmform.schema.cloudinit import volume_name as seed_volume_name

    resources = list(resources)
    directories, pools, by_pool = [], set(), {}
    for resource in resources:
        if resource.kind.name != "pool":
            continue
        pools.add(resource.libvirt_name)
        path = resource.values.get("path")
        if not resource.values.get("existing") and isinstance(path, str) and path.startswith("/"):
            normal = os.path.normpath(path)
            if normal != "/":
                directories.append(normal)
                by_pool[resource.libvirt_name] = normal
    declared: set[str] = set()
    for resource in resources:
        if resource.kind.name not in ("volume", "cloudinit"):
            continue
        directory = by_pool.get(str(resource.desired.get("pool") or resource.values.get("pool")))
        if directory is None:
            continue
        name = resource.libvirt_name if resource.kind.name == "volume" else seed_volume_name(resource.libvirt_name)
        declared.add(os.path.join(directory, name))
    return Scope(tuple(sorted(set(directories))), frozenset(pools), frozenset(declared) if volumes else None,
                 tuple(roots))


def _source_path(source: Element) -> tuple[str, str] | None:
    for attr in ("file", "dev", "dir", "path"):
        value = source.get(attr)
        if value is not None:
            return attr, value
    return None


def _disk(disk: Element, scope: Scope) -> Iterator[Finding]:
    target = disk.find("target")
    name = (target.get("dev") if target is not None else None) or "?"
    label = f"{disk.get('device') or 'disk'} {name}"
    where = ("disks", name)
    if disk.get("type") == "nvme":
        yield Finding(HOST_DEVICES, f"{label}: a host NVMe controller", where)
    for source in disk.iter("source"):
        if source.get("pool") is not None:
            if source.get("pool") not in scope.pools:
                yield Finding(HOST_PATHS, f"{label}: volume {source.get('volume')} of pool {source.get('pool')}, a "
                              "pool the manifests do not declare", where)
            continue
        found = _source_path(source)
        if found is None:
            continue
        attr, path = found
        owner = source.getparent()
        kind = owner.get("type") if owner is not None else None
        if attr == "dev" or kind == "block":
            yield Finding(HOST_PATHS, f"{label}: {path} is a host block device", where)
        elif kind == "network" or kind == "vhostuser":
            continue
        elif not scope.inside(path):
            yield Finding(HOST_PATHS, f"{label}: {path} {scope.why_outside(path)}", where)


def _hostdev_text(node: Element) -> str:
    address = node.find("source/address")
    if node.get("type") == "pci" and address is not None:
        try:
            return "PCI " + "{:04x}:{:02x}:{:02x}.{:x}".format(
                *(int(address.get(part) or "0", 16) for part in ("domain", "bus", "slot", "function")))
        except ValueError:
            pass
    return f"{node.get('type') or node.get('mode') or 'host'} device"


def _domain(root: Element, scope: Scope) -> Iterator[Finding]:
    for node in root.findall("devices/emulator"):
        yield Finding(CUSTOM_EMULATOR, f"<emulator>{(node.text or '').strip()}</emulator>")
    for node in root.findall("devices/hostdev"):
        text = _hostdev_text(node)
        field: tuple[str | int, ...] = ("hostdevs", text[4:]) if text.startswith("PCI ") else ()
        yield Finding(HOST_DEVICES, f"hostdev {text}", field)
    for _node in root.findall("devices/interface[@type='hostdev']"):
        yield Finding(HOST_DEVICES, "interface type='hostdev'")
    for node in root.xpath("devices/input[@type='passthrough' or @type='evdev']"):
        yield Finding(HOST_DEVICES, f"input type='{node.get('type')}'")
    for _node in root.findall("devices/tpm/backend[@type='passthrough']"):
        yield Finding(HOST_DEVICES, "tpm backend type='passthrough'")
    for _node in root.findall("devices/smartcard[@mode='host']"):
        yield Finding(HOST_DEVICES, "smartcard mode='host'")
    for disk in root.findall("devices/disk"):
        yield from _disk(disk, scope)
    for node in root.findall("devices/filesystem"):
        source = node.find("source")
        found = _source_path(source) if source is not None else None
        if found is None or node.get("type") not in (None, "mount", "file", "block"):
            continue
        target = node.find("target")
        tag = target.get("dir") if target is not None else None
        if found[0] == "dev" or node.get("type") == "block":
            yield Finding(HOST_PATHS, f"filesystem {tag}: {found[1]} is a host block device", ("filesystems", tag or ""))
        elif not scope.inside(found[1]):
            yield Finding(HOST_PATHS, f"filesystem {tag}: {found[1]} {scope.why_outside(found[1])}",
                          ("filesystems", tag or ""))
    for tag in ("kernel", "initrd", "dtb"):
        for node in root.findall(f"os/{tag}"):
            path = (node.text or "").strip()
            if path and not scope.inside(path):
                yield Finding(HOST_PATHS, f"{tag} {path} {scope.why_outside(path)}", (tag,))
    for device in root.xpath("|".join(f"devices/{tag}" for tag in _CHAR_DEVICES)):
        if device.get("type") in _PATH_CHAR_TYPES:
            source = device.find("source")
            path = source.get("path") if source is not None else None
            if path and not scope.inside(path) and not _safe(path):
                yield Finding(HOST_PATHS, f"{device.tag} type='{device.get('type')}': {path} "
                              f"{scope.why_outside(path)}")
        for log in device.findall("log"):
            path = log.get("file") or ""
            if path and not (os.path.normpath(path).startswith(CONSOLE_LOG_DIR) and ".." not in path.split("/")) \
                    and not scope.inside(path):
                yield Finding(HOST_PATHS, f"console log {path} is outside the pools this project manages and "
                              f"{CONSOLE_LOG_DIR}", ("console_log",))


def _network(root: Element) -> Iterator[Finding]:
    forward = root.find("forward")
    if forward is not None and (forward.get("mode") == "hostdev" or forward.find("pf") is not None):
        yield Finding(HOST_DEVICES, f"forward mode='{forward.get('mode')}'")


# Host paths the checks above report with their own words (or under another opt-in): not reported twice.
_CHECKED_ELSEWHERE = ("domain/devices/disk/", "domain/devices/filesystem/", "domain/os/kernel", "domain/os/initrd",
                      "domain/os/dtb", "domain/devices/emulator", "domain/devices/hostdev/", "domain/devices/input/",
                      "domain/devices/tpm/", "domain/devices/smartcard/",
                      *(f"domain/devices/{tag}/" for tag in _CHAR_DEVICES))
# Paths that libvirt and QEMU use on every host and that give a guest nothing of the host's: firmware images,
# libvirt's own NVRAM and channel directories, the kernel's entropy sources.
SAFE_HOST_PATHS = ("/usr/share/OVMF/", "/usr/share/ovmf/", "/usr/share/AAVMF/", "/usr/share/edk2/",
                   "/usr/share/qemu/", "/usr/share/seabios/", "/var/lib/libvirt/qemu/nvram/",
                   "/var/lib/libvirt/qemu/channel/", "/dev/urandom", "/dev/random", "/dev/hwrng")


def _safe(path: str) -> bool:
    normal = os.path.normpath(path)
    if ".." in path.split("/") or not normal.startswith("/"):
        return False
    return any(normal.startswith(safe) if safe.endswith("/") else normal == safe for safe in SAFE_HOST_PATHS)


def _schema_paths(kind: str, root: Element, scope: Scope, skip: tuple[str, ...]) -> Iterator[Finding]:
    """Every other value libvirt's schema types as a host path (its path datatypes, and attributes it leaves
    untyped but names path, file, dir, socket or root): a loader, an NVRAM file, a unix socket, a script libvirt
    runs, a TFTP root, … Derived from the schema (vmform.schema.generic.host_path_values), not a hand list."""
    from vmform.schema.generic import SchemaUnavailable, host_path_values

    try:
        found = list(host_path_values(root, kind))
    except (SchemaUnavailable, OSError):  # no schemas on this machine: the curated checks still hold
        return
    for where, value in found:
        if any(where == prefix.rstrip("/") or where.startswith(prefix) for prefix in skip):
            continue
        relative = not value.startswith("/")
        if relative and ".." not in value.split("/"):
            continue  # a name inside something else's directory (a TFTP boot file, …)
        if not relative and _safe(value):
            continue
        if not relative and scope.inside(value):
            continue
        shown = where.split("/", 1)[1] if "/" in where else where
        yield Finding(HOST_PATHS, f"{shown}: {value} {scope.why_outside(value)}")


def findings(kind: str, root: Element, scope: Scope) -> list[Finding]:
    """What the document does that needs an opt-in."""
    if kind == "domain":
        return [*_domain(root, scope), *_schema_paths("domain", root, scope, _CHECKED_ELSEWHERE)]
    if kind == "network":
        return [*_network(root), *_schema_paths("network", root, scope, ())]
    return []


def refused_message(finding: Finding, stage: str = "") -> str:
    added = "the XSLT stylesheet adds " if stage == "xslt" else ""
    return (f"{added}{finding.what}{WHY[finding.opt_in]}; refused unless the resource says "
            f"allow: [{finding.opt_in}]")


def _curated_position(resource: Any, field: tuple[str | int, ...]) -> Position:
    if not field:
        return resource.key_position()
    name = field[0]
    if len(field) == 1:
        return resource.position(name)
    key = field[1]
    if name == "disks":
        for number, disk in enumerate(resource.desired.get("disks") or []):
            if disk.get("target") == key and number < len(resource.values.get("disks") or []):
                raw = resource.values["disks"][number]
                inner = "path" if isinstance(raw, dict) and raw.get("path") is not None else "volume"
                return resource.position("disks", number, inner)
        return resource.position("disks")
    match = {"hostdevs": "pci", "filesystems": "target"}.get(str(name))
    for number, item in enumerate(resource.values.get(str(name)) or []):
        if isinstance(item, dict) and match and str(item.get(match, "")).lower() == str(key).lower():
            return resource.position(name, number)
    return resource.position(name)


def _xml_position(resource: Any, finding: Finding) -> Position:
    """The key of the xml: section's part that holds what was found (devices: hostdev, os: kernel, …)."""
    head = finding.what.split(" ", 1)[0].strip("<").split(">", 1)[0]
    tag = {"disk": "disk", "cdrom": "disk", "hostdev": "hostdev", "filesystem": "filesystem", "interface":
           "interface", "input": "input", "tpm": "tpm", "smartcard": "smartcard", "emulator": "emulator",
           "forward": "forward", "kernel": "kernel", "initrd": "initrd", "dtb": "dtb"}.get(head, head)
    data = resource.values.get("xml") or {}
    for path in (("devices", tag), ("os", tag), (tag,), ("devices",), ("os",)):
        node: Any = data
        for step in path:
            node = node.get(step) if isinstance(node, dict) else None
        if node is not None:
            return resource.key_position("xml", *path)
    return resource.key_position("xml")


def _render(resource: Any, values: dict[str, Any]) -> Element | None:
    from vmform.render.xml import render_resource

    try:
        return render_resource(resource.kind.name, resource.libvirt_name, values, "check", resource.address)
    except Exception:  # noqa: BLE001 - a document that cannot be rendered is reported by other checks
        return None


def _pool(resource: Any, scope: Scope) -> Iterator[tuple[str, Position]]:
    """A pool vmform makes outside the pool roots needs allow: [host_paths]; (system directories are refused
    always, by schema/pool.py's check)."""
    path = resource.values.get("path")
    if resource.values.get("existing") or not isinstance(path, str) or not path.startswith("/"):
        return
    if scope.in_roots(path) or HOST_PATHS in (resource.values.get("allow") or []):
        return
    yield (f"pool directory {path} is outside the pool roots ({', '.join(scope.roots)}; vmform.toml's pool_roots "
           f"adds more); refused unless the resource says allow: [{HOST_PATHS}]", resource.position("path"))


def check(resources: Iterable[Any], roots: tuple[str, ...] = DEFAULT_POOL_ROOTS) -> Iterator[tuple[str, Position]]:
    """(message, position) for every opt-in a resource needs and does not state. Only what the document vmform
    would send holds is refused; each finding is reported where it first appears (curated fields, xml:, xslt:)."""
    resources = list(resources)
    scope = scope_of(resources, roots)
    for resource in resources:
        if resource.kind.name == "pool":
            yield from _pool(resource, scope)
        if resource.kind.name not in ("domain", "network") or resource.values.get("existing"):
            continue
        allowed = set(resource.values.get("allow") or [])
        desired = resource.desired
        final = _render(resource, desired)
        if final is None:
            continue
        refused = Counter(f for f in findings(resource.kind.name, final, scope) if f.opt_in not in allowed)
        if not refused:
            continue  # the usual case: one rendering
        stages = [("curated", {k: v for k, v in desired.items() if k not in ("xml", "xslt")})]
        if desired.get("xml"):
            stages.append(("xml", {k: v for k, v in desired.items() if k != "xslt"}))
        seen: Counter[Finding] = Counter()
        for stage, values in stages:
            root = _render(resource, values)
            found = Counter(findings(resource.kind.name, root, scope)) if root is not None else Counter()
            for finding in (found - seen) & refused:
                yield refused_message(finding, stage), _position(resource, finding, stage)
            seen |= found
        for finding in refused - seen:
            yield refused_message(finding, "xslt"), _position(resource, finding, "xslt")


def _position(resource: Any, finding: Finding, stage: str) -> Position:
    if stage == "curated":
        return _curated_position(resource, finding.field)
    if stage == "xml":
        return _xml_position(resource, finding)
    return resource.position("xslt")


def needed(kind: str, root: Element, scope: Scope) -> list[str]:
    """The opt-ins a document (e.g. one being imported) needs, sorted."""
    return sorted({finding.opt_in for finding in findings(kind, root, scope)})


def emulator_text(root: Element) -> str | None:
    node = root.find("devices/emulator")
    return None if node is None else (node.text or "").strip()

