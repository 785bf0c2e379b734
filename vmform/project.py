"""vmform.toml: finding a project's root (walking up, as git does) and reading its settings."""

from __future__ import annotations

import glob
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmform.errors import Position, ProjectError
from vmform.schema.types import did_you_mean

PROJECT_FILE = "vmform.toml"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_KEYS = {"name", "uri", "manifests", "parallelism", "shutdown_timeout", "force_off", "reconnect_timeout", "default_host",
         "pool_roots", "detach_timeout"}
_HOST_KEYS = {"uri", "parallelism", "migration_uri"}
HOST_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
DEFAULT_HOST = "default"  # the one host of a project without [hosts]: project.uri


@dataclass(frozen=True)
class Host:
    """A libvirt host of the project: a name resources use (host: b) and how to reach it."""

    name: str
    uri: str | None  # None: libvirt's own default (LIBVIRT_DEFAULT_URI, then the daemon's)
    parallelism: int | None = None  # this host's own bound on concurrent changes (default: the project's)
    migration_uri: str | None = None  # where QEMU on another host sends this host a migration (tcp://b.lan)


@dataclass(frozen=True)
class Project:
    root: Path
    name: str
    uri: str | None  # None: libvirt's own default (LIBVIRT_DEFAULT_URI, then the daemon's)
    manifest_patterns: tuple[str, ...]
    parallelism: int = 8
    shutdown_timeout: int = 60
    settings: dict[str, Any] = field(default_factory=dict)
    # Power a domain off when it has not shut down within shutdown_timeout (else that change fails).
    force_off: bool = False
    # How long a command waits for libvirtd to accept a new connection after it dropped one (a restart).
    reconnect_timeout: float = 30.0
    hosts: dict[str, Host] = field(default_factory=dict)  # by name; one named "default" without [hosts]
    default_host: str = DEFAULT_HOST
    # Directories beyond the default pool roots where pools may be made without allow: [host_paths] (every plan
    # shows them in bold).
    pool_roots: tuple[str, ...] = ()
    # How long a hot-unplug waits for the guest to release the device; then it leaves at the next restart.
    detach_timeout: float = 30.0

    @property
    def several_hosts(self) -> bool:
        return len(self.hosts) > 1 or DEFAULT_HOST not in self.hosts

    @property
    def config_file(self) -> Path:
        return self.root / PROJECT_FILE

    def manifest_files(self) -> list[Path]:
        """Manifest files in a stable order; each pattern is relative to the project root."""
        found: list[Path] = []
        for pattern in self.manifest_patterns:
            matches = sorted(glob.glob(str(self.root / pattern), recursive=True))
            for match in matches:
                path = Path(match)
                if path.is_file() and path not in found:
                    found.append(path)
        return found


def find_root(start: Path) -> Path:
    current = start.resolve()
    for candidate in (current, *current.parents):
        if (candidate / PROJECT_FILE).is_file():
            return candidate
    raise ProjectError(f"no {PROJECT_FILE} found in {start} or any parent directory (run vmform inside a project, or use -C DIR)")


def load_project(start: Path | str | None = None) -> Project:
    root = find_root(Path(start) if start is not None else Path.cwd())
    config_file = root / PROJECT_FILE
    shown = os.path.relpath(config_file)
    try:
        settings = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", 1) or 1
        column = getattr(exc, "colno", 1) or 1
        raise ProjectError(f"invalid TOML: {str(exc).split(' (at')[0]}", Position(shown, line, column)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProjectError(f"cannot read {shown}: {exc}") from None
    section = settings.get("project", {})
    if not isinstance(section, dict):
        raise ProjectError(f"{shown}: [project] must be a table")
    for key in section:
        if key not in _KEYS:
            raise ProjectError(f"{shown}: unknown setting 'project.{key}'{did_you_mean(key, sorted(_KEYS))}")
    for key in settings:
        if key not in ("project", "variables", "vars", "hosts"):
            known = ["project", "variables", "vars", "hosts"]
            raise ProjectError(f"{shown}: unknown table '{key}'{did_you_mean(key, known)}")
    for key in ("variables", "vars", "hosts"):
        if not isinstance(settings.get(key, {}), dict):
            raise ProjectError(f"{shown}: [{key}] must be a table")
    name = section.get("name", root.name)
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ProjectError(f"{shown}: project.name must be letters, digits and _.- (got {name!r})")
    uri = section.get("uri")
    if uri is not None and (not isinstance(uri, str) or not uri):
        raise ProjectError(f"{shown}: project.uri must be a libvirt URI string")
    patterns = section.get("manifests", ["*.yaml", "*.yml"])
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ProjectError(f"{shown}: project.manifests must be a list of glob patterns")
    for pattern in patterns:
        if os.path.isabs(pattern) or ".." in Path(pattern).parts:
            raise ProjectError(f"{shown}: manifest pattern '{pattern}' must stay inside the project")
    parallelism = section.get("parallelism", 8)
    if isinstance(parallelism, bool) or not isinstance(parallelism, int) or not 1 <= parallelism <= 64:
        raise ProjectError(f"{shown}: project.parallelism must be a whole number from 1 to 64")
    timeout = section.get("shutdown_timeout", 60)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
        raise ProjectError(f"{shown}: project.shutdown_timeout must be a number of seconds")
    force_off = section.get("force_off", False)
    if not isinstance(force_off, bool):
        raise ProjectError(f"{shown}: project.force_off must be true or false")
    reconnect = section.get("reconnect_timeout", 30)
    if isinstance(reconnect, bool) or not isinstance(reconnect, int | float) or reconnect < 0:
        raise ProjectError(f"{shown}: project.reconnect_timeout must be a number of seconds")
    detach = section.get("detach_timeout", 30)
    if isinstance(detach, bool) or not isinstance(detach, int | float) or detach < 0:
        raise ProjectError(f"{shown}: project.detach_timeout must be a number of seconds")
    hosts, default_host = _hosts(settings, uri, shown)
    return Project(root, name, hosts[default_host].uri, tuple(patterns), parallelism, timeout, settings, force_off,
                   float(reconnect), hosts, default_host, extra_pool_roots(settings, shown), float(detach))


def extra_pool_roots(settings: dict[str, Any], shown: str = PROJECT_FILE) -> tuple[str, ...]:
    """[project] pool_roots: absolute directories, none of them a system directory (or one holding one)."""
    from vmform.schema.optins import system_directory

    raw = (settings.get("project") or {}).get("pool_roots", [])
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise ProjectError(f"{shown}: project.pool_roots must be a list of absolute directories")
    roots = []
    for item in raw:
        normal = os.path.normpath(item)
        if not item.startswith("/") or "\x00" in item or ".." in item.split("/"):
            raise ProjectError(f"{shown}: project.pool_roots: {item!r} is not an absolute directory")
        why = system_directory(normal)
        if why:
            raise ProjectError(f"{shown}: project.pool_roots: {item!r} {why}")
        roots.append(normal)
    return tuple(roots)


def _hosts(settings: dict[str, Any], uri: str | None, shown: str) -> tuple[dict[str, Host], str]:
    """[hosts.NAME] tables (uri, parallelism, migration_uri) or NAME = "uri"; without them, one host."""
    table = settings.get("hosts") or {}
    section = settings.get("project", {})
    if not table:
        if "default_host" in section:
            raise ProjectError(f"{shown}: project.default_host names a host of [hosts], and there is none")
        return {DEFAULT_HOST: Host(DEFAULT_HOST, uri)}, DEFAULT_HOST
    if uri is not None:
        raise ProjectError(f"{shown}: with [hosts], each host has its uri; drop project.uri (project.default_host "
                           "chooses the host of resources that do not say host:)")
    hosts: dict[str, Host] = {}
    for host_name, raw in table.items():
        if not HOST_NAME.fullmatch(host_name):
            raise ProjectError(f"{shown}: host name {host_name!r} must be letters, digits, _ and - (starting with a "
                               "letter)")
        spec = {"uri": raw} if isinstance(raw, str) else raw
        if not isinstance(spec, dict):
            raise ProjectError(f"{shown}: [hosts] {host_name} is a libvirt URI or a table with uri")
        for key in spec:
            if key not in _HOST_KEYS:
                raise ProjectError(f"{shown}: unknown setting 'hosts.{host_name}.{key}'"
                                   f"{did_you_mean(key, sorted(_HOST_KEYS))}")
        host_uri = spec.get("uri")
        if not isinstance(host_uri, str) or not host_uri:
            raise ProjectError(f"{shown}: hosts.{host_name}.uri must be a libvirt URI string")
        parallelism = spec.get("parallelism")
        if parallelism is not None and (isinstance(parallelism, bool) or not isinstance(parallelism, int)
                                        or not 1 <= parallelism <= 64):
            raise ProjectError(f"{shown}: hosts.{host_name}.parallelism must be a whole number from 1 to 64")
        migration_uri = spec.get("migration_uri")
        if migration_uri is not None and (not isinstance(migration_uri, str) or not migration_uri):
            raise ProjectError(f"{shown}: hosts.{host_name}.migration_uri must be a URI string (tcp://HOST)")
        hosts[host_name] = Host(host_name, host_uri, parallelism, migration_uri)
    default_host = section.get("default_host", next(iter(hosts)))
    if default_host not in hosts:
        raise ProjectError(f"{shown}: project.default_host '{default_host}' is not in [hosts]"
                           f"{did_you_mean(str(default_host), list(hosts))}")
    return hosts, default_host


def host_names(settings: dict[str, Any]) -> tuple[list[str], str]:
    """The host names a manifest may use, and the default one (settings as loaded, already checked)."""
    table = settings.get("hosts") or {}
    if not table:
        return [DEFAULT_HOST], DEFAULT_HOST
    return list(table), (settings.get("project") or {}).get("default_host", next(iter(table)))
