"""The one exception hierarchy. Every message is written for the user; the CLI prints it as one line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Position:
    """Where a value sits in a manifest file (1-based line and column)."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class VmformError(Exception):
    """Base of every error vmform reports to a user."""

    def __init__(self, message: str, position: Position | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position

    def __str__(self) -> str:
        if self.position is not None:
            return f"{self.position}: {self.message}"
        return self.message


class ProjectError(VmformError):
    """vmform.toml is missing or wrong."""


class ManifestError(VmformError):
    """One mistake in a manifest, at a file position."""


class ManifestErrors(VmformError):
    """Every mistake found in one load, reported together."""

    def __init__(self, errors: list[ManifestError]) -> None:
        self.errors = sorted(errors, key=lambda e: (e.position or Position("", 0, 0), e.message))
        super().__init__("\n".join(str(e) for e in self.errors))


class PlanError(VmformError):
    """The manifests are valid but cannot be planned against this host (collision, refusal, ...)."""


class PlanErrors(VmformError):
    def __init__(self, errors: list[PlanError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class HostError(VmformError):
    """The libvirt host cannot be reached or refused a call."""


class ConnectionLost(HostError):
    """libvirtd dropped the connection (it restarted or stopped) and it could not be opened again."""


class LockError(VmformError):
    """The project's lock is held by someone else."""


class ApplyError(VmformError):
    """Some changes failed; the summary says which."""


class VolumeInUse(VmformError):
    """Apply found, right before deleting a volume, that something on the host still uses it: the volume is
    kept (and stays owned), and a later apply deletes it once nothing uses it."""
