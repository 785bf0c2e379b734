"""Saved plans: ``vmform plan -out FILE`` writes one, ``vmform apply FILE`` executes exactly it.

A plan file is versioned JSON: the Plan itself (``Plan.to_json``, the documented schema) wrapped in what
apply needs to know whether the plan still holds:

- the project and the libvirt host it was made for (URI, hostname and host UUID: one URI such as
  ``qemu:///system`` names a different host on every machine);
- a fingerprint of the manifests and project settings (and a slot for variables);
- a digest per address of the live state the plan read, so a refusal can name what changed.

Apply re-reads the host under the project lock and refuses a plan whose fingerprints no longer match;
it never re-plans. Integrity: the file carries a digest over all of its content, the project and the host
identities included, so a file that was truncated, edited by hand or made for another host is refused before
any change is made; and its changes must be exactly the plan the manifests and the host give now (they are
compared, not used), so an edit that recomputed the digest is refused as well. The file holds desired values in full (sensitive ones too), as Terraform's does:
treat it like the manifests' secrets.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmform import __version__
from vmform.errors import VmformError
from vmform.plan import PLAN_FORMAT_VERSION, Plan

if TYPE_CHECKING:
    from vmform.live import LiveObject, LiveState
    from vmform.model import Manifests
    from vmform.project import Project

FILE_KIND = "vmform-plan"


class PlanFileError(VmformError):
    """A plan file that cannot be read, or is not a vmform plan of a format this vmform knows."""


class StalePlanError(VmformError):
    """The host, the manifests, the project or the host identity differ from when the plan was made."""


@dataclass(frozen=True)
class Fingerprints:
    manifests: str  # digest of vmform.toml, every manifest file and the source images they upload
    live: dict[str, str | None]  # address -> digest of the live object the plan read (None: there was none)
    variables: str | None = None  # reserved: digest of the variables, once manifests have them


@dataclass(frozen=True)
class SavedPlan:
    plan: Plan
    host: dict[str, str]  # uri, hostname, uuid (connection.host_identity)
    fingerprints: Fingerprints
    targets: tuple[str, ...] = ()
    created: float = field(default_factory=time.time)
    vmform_version: str = __version__
    hosts: dict[str, dict[str, str]] = field(default_factory=dict)  # several hosts: each one's identity, by name
    restart: bool = False  # made with plan --restart (the re-derived plan must be made the same way)

    def describe(self) -> str:
        made = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.created))
        limited = f", limited to {', '.join(self.targets)}" if self.targets else ""
        return (f"plan of project {self.plan.project} for {_host_text(self.host)}, made {made} by vmform "
                f"{self.vmform_version}{limited}")

    def to_json(self) -> dict[str, Any]:
        # The full desired values: apply executes exactly these (never a masked display form).
        return {
            "kind": FILE_KIND,
            "format_version": PLAN_FORMAT_VERSION,
            "vmform_version": self.vmform_version,
            "created": self.created,
            "project": self.plan.project,
            "host": dict(self.host),
            "hosts": {name: dict(identity) for name, identity in self.hosts.items()},
            "targets": list(self.targets),
            "restart": self.restart,
            "fingerprints": {
                "manifests": self.fingerprints.manifests,
                "variables": self.fingerprints.variables,
                "live": dict(sorted(self.fingerprints.live.items())),
            },
            "plan": self.plan.to_json(mask=False),  # apply needs the real values: the file is 0600
        }


def content_digest(document: dict[str, Any]) -> str:
    """The digest of a plan file's content: every key but the digest itself, canonical JSON."""
    return "sha256:" + _digest({key: value for key, value in document.items() if key != "digest"})


def write(path: Path | str, saved: SavedPlan) -> None:
    """Write atomically (a temporary file renamed into place), readable only by its owner."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    document = saved.to_json()
    document["digest"] = content_digest(document)
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            json.dump(document, stream, indent=1, sort_keys=False)
            stream.write("\n")
        os.replace(temporary, target)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise PlanFileError(f"cannot write plan file {path}: {exc.strerror or exc}") from None


def read(path: Path | str) -> SavedPlan:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanFileError(f"cannot read plan file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise PlanFileError(f"{path} is not a vmform plan file (not JSON)") from None
    if not isinstance(data, dict) or data.get("kind") != FILE_KIND:
        raise PlanFileError(f"{path} is not a vmform plan file (make one with vmform plan -out FILE)")
    version = data.get("format_version")
    if not isinstance(version, int):
        raise PlanFileError(f"{path}: plan file without a format version")
    if version > PLAN_FORMAT_VERSION:
        raise PlanFileError(f"{path} was written by a newer vmform ({data.get('vmform_version', '?')}, plan format "
                            f"{version}); this vmform {__version__} reads plan format {PLAN_FORMAT_VERSION}: upgrade vmform")
    if version < PLAN_FORMAT_VERSION:
        raise PlanFileError(f"{path} has plan format {version} (vmform {data.get('vmform_version', '?')}); this vmform "
                            f"reads format {PLAN_FORMAT_VERSION} only: make the plan again with vmform plan -out")
    if not isinstance(data.get("digest"), str):
        raise PlanFileError(f"{path} carries no digest (made by an older vmform, or cut short): make the plan again "
                            "with vmform plan -out")
    if data["digest"] != content_digest(data):
        raise PlanFileError(f"{path} was edited or damaged since vmform wrote it (its digest does not match its "
                            "content): make the plan again with vmform plan -out")
    try:
        prints = data["fingerprints"]
        return SavedPlan(
            plan=Plan.from_json(data["plan"]),
            host={k: str(v) for k, v in data["host"].items()},
            fingerprints=Fingerprints(str(prints["manifests"]), dict(prints["live"]), prints.get("variables")),
            targets=tuple(data.get("targets", ())),
            created=float(data.get("created", 0)),
            vmform_version=str(data.get("vmform_version", "?")),
            hosts={str(name): {k: str(v) for k, v in identity.items()} for name, identity in
                   (data.get("hosts") or {}).items()},
            restart=bool(data.get("restart", False)),
        )
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise PlanFileError(f"{path} is damaged: {type(exc).__name__} {exc}") from None


# --- fingerprints ---------------------------------------------------------------------------------


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def manifests_fingerprint(project: Project, manifests: Manifests) -> str:
    """vmform.toml and every manifest file by content (paths relative to the project root, so another
    checkout of the same commit matches), plus the digests of the images volumes upload."""
    parts: list[Any] = [("vmform.toml", project.config_file.read_bytes().hex())]
    for file in sorted(project.manifest_files()):
        parts.append((os.path.relpath(file, project.root), hashlib.sha256(file.read_bytes()).hexdigest()))
    # The modules' manifests too (listed after the project's, relative to its root: ../../modules/…).
    for shown in manifests.files[len(project.manifest_files()):]:
        module_file = project.root / shown
        if module_file.is_file():
            parts.append((shown, hashlib.sha256(module_file.read_bytes()).hexdigest()))
    for address, resource in sorted(manifests.resources.items()):
        if resource.desired.get("source_sha256"):
            parts.append((address, resource.desired["source_sha256"]))
    return _digest(parts)


def _object_digest(obj: LiveObject | None) -> str | None:
    if obj is None:
        return None
    return _digest({
        "kind": obj.kind, "name": obj.name, "values": obj.values, "running": obj.running_values,
        "active": obj.active, "identity": obj.identity, "address": obj.address, "owner": obj.owner_project,
        "persistent": obj.persistent, "duplicates": obj.duplicates,
    })


def read_objects(manifests: Manifests, live: LiveState) -> dict[str, LiveObject | None]:
    """The live object behind every address the plan decides about: each declared resource (the object
    it owns, or one that merely has its name) and each owned object no longer declared."""
    owned = live.owned()
    found: dict[str, LiveObject | None] = {}
    for address, resource in manifests.resources.items():
        kind = resource.kind.name
        obj = owned.get(address)
        if obj is None or obj.kind != kind:
            pool = resource.desired.get("pool") if kind == "volume" else None
            obj = live.by_name(kind, resource.libvirt_name, pool)
        found[address] = obj
    for address, obj in owned.items():
        found.setdefault(address, obj)
    return found


def live_fingerprints(manifests: Manifests, live: LiveState) -> dict[str, str | None]:
    return {address: _object_digest(obj) for address, obj in read_objects(manifests, live).items()}


# --- staleness ------------------------------------------------------------------------------------


def _host_text(host: dict[str, str]) -> str:
    return f"{host.get('hostname', '?')} (host UUID {host.get('uuid') or 'unknown'}, {host.get('uri', '?')})"


def check_project(saved: SavedPlan, project_name: str) -> None:
    if saved.plan.project != project_name:
        raise StalePlanError(f"this plan was made for project {saved.plan.project}, not {project_name}")


def check_host(saved: SavedPlan, host: dict[str, str], expected: dict[str, str] | None = None) -> None:
    """The host reached now is the one the plan was made for (``expected``: one of several hosts')."""
    then = expected if expected is not None else saved.host
    if then.get("hostname") != host.get("hostname") or then.get("uuid") != host.get("uuid"):
        raise StalePlanError(f"this plan was made for host {_host_text(then)}, not for {_host_text(host)}")


def check_fresh(saved: SavedPlan, manifests_now: str, live_now: dict[str, str | None]) -> None:
    """Refuse the plan when the manifests or any object it read changed; name what changed."""
    if saved.fingerprints.manifests != manifests_now:
        raise StalePlanError("plan is stale: the manifests or vmform.toml changed since the plan was made; "
                             "make a new plan")
    then = saved.fingerprints.live
    messages = []
    for address in sorted(set(then) | set(live_now)):
        before, after = then.get(address), live_now.get(address)
        if before == after:
            continue
        if before is None:
            messages.append(f"{address} appeared on the host")
        elif after is None:
            messages.append(f"{address} disappeared from the host")
        else:
            messages.append(f"{address} changed on the host")
    if messages:
        raise StalePlanError(f"plan is stale: {', '.join(messages)} since the plan was made; make a new plan")


def check_same_plan(saved: SavedPlan, derived: Plan) -> None:
    """The saved plan's changes are exactly what the manifests and the host give now. The fingerprints matched,
    so a difference was written into the file by hand, or comes from what the plan reads beyond the objects it
    fingerprints (who uses a volume it deletes); either way the file is not applied."""
    mine, theirs = saved.plan.to_json(mask=False), derived.to_json(mask=False)
    if mine["changes"] == theirs["changes"]:
        return
    saved_changes = {change["address"]: change for change in mine["changes"]}
    derived_changes = {change["address"]: change for change in theirs["changes"]}
    differing = sorted(address for address in set(saved_changes) | set(derived_changes)
                       if saved_changes.get(address) != derived_changes.get(address))
    raise StalePlanError(f"this plan file's changes are not the plan its manifests and the host give now "
                         f"({', '.join(differing[:5])}{' …' if len(differing) > 5 else ''} differ): the file was "
                         "edited, or the host changed where the plan did not look (a volume came into use); make "
                         "the plan again with vmform plan -out")


def plan_json_schema() -> dict[str, Any]:
    """The JSON Schema of ``Plan.to_json`` (docs/JSON.md), shipped in the package."""
    from importlib.resources import files

    return dict(json.loads(files("vmform").joinpath("schemas/plan.schema.json").read_text(encoding="utf-8")))
