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
_KEYS = {"name", "uri", "manifests", "parallelism", "shutdown_timeout", "force_off", "reconnect_timeout"}


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
        if key not in ("project", "variables", "vars"):
            raise ProjectError(f"{shown}: unknown table '{key}'{did_you_mean(key, ['project', 'variables', 'vars'])}")
    for key in ("variables", "vars"):
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
    return Project(root, name, uri, tuple(patterns), parallelism, timeout, settings, force_off, float(reconnect))
