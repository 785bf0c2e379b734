"""Plan, Change and Action: plain, immutable data. Printed for humans, saved as JSON, applied later."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from vmform.schema.types import Effect

# The version of the plan's JSON (docs/JSON.md, vmform/schemas/plan.schema.json) and of saved plan files.
# Bump it when a reader of the old shape would misread the new one.
PLAN_FORMAT_VERSION = 1


class Action(Enum):
    """Each value is its plan symbol."""

    CREATE = "+"
    UPDATE = "~"
    DELETE_THEN_CREATE = "-/+"
    CREATE_THEN_DELETE = "+/-"
    DELETE = "-"
    MIGRATE = ">"  # a domain moving to another host of the project (live when it runs)

    def is_replace(self) -> bool:
        return self in (Action.DELETE_THEN_CREATE, Action.CREATE_THEN_DELETE)


@dataclass(frozen=True)
class FieldChange:
    path: str  # "memory", "interfaces[52:54:00:aa:00:01]"
    before: Any
    after: Any
    effect: Effect
    display_before: str = ""
    display_after: str = ""


@dataclass(frozen=True)
class Change:
    address: str
    kind: str
    name: str  # libvirt name (after the change)
    action: Action
    host: str = "default"
    before: dict[str, Any] | None = None  # live values in manifest field terms
    after: dict[str, Any] | None = None  # desired values in libvirt terms
    fields: tuple[FieldChange, ...] = ()
    reason: str = ""  # why a replace is needed
    depends_on: tuple[str, ...] = ()  # addresses that must be done first (apply order)
    live_name: str | None = None  # the libvirt name today, when it differs
    identity: dict[str, Any] = field(default_factory=dict)  # uuid / pool uuid / volume key, to find the object
    restart: bool = False  # apply restarts the domain or network so restart-class changes take effect
    replug: tuple[str, ...] = ()  # running domains whose interfaces a network restart re-plugs
    # The domain may be restarted (restart_policy: allowed, apply --restart): when its guest does not release a
    # hot-unplugged device, apply restarts it so the device leaves now, instead of at the next restart.
    restart_allowed: bool = False

    @property
    def waits_for_restart(self) -> bool:
        """Restart-class changes that this apply writes but does not restart for."""
        return not self.restart and any(f.effect is Effect.RESTART for f in self.fields)


def _field_json(kind: str, field_change: FieldChange) -> dict[str, Any]:
    data = {**asdict(field_change), "effect": field_change.effect.value}
    top = field_change.path.split("[", 1)[0]
    masked_values = mask_sensitive(kind, {top: field_change.before}), mask_sensitive(kind, {top: field_change.after})
    data["before"], data["after"] = masked_values[0][top], masked_values[1][top]  # type: ignore[index]
    return data


def mask_sensitive(kind: str, values: dict[str, Any] | None) -> dict[str, Any] | None:
    """A copy of a resource's values with each sensitive field shown as ``(sensitive, sha256:…, N bytes)``."""
    from vmform.schema.registry import KINDS
    from vmform.sensitive import masked

    if values is None or kind not in KINDS:
        return values
    hidden = {spec.name for spec in KINDS[kind].fields if spec.sensitive}
    return {key: masked(value) if key in hidden and value is not None else value for key, value in values.items()}


@dataclass(frozen=True)
class Plan:
    project: str
    host_uri: str  # the default host's URI
    changes: tuple[Change, ...]
    notes: tuple[str, ...] = ()  # things the user should know that are not changes (pending restarts, ...)
    # The opt-ins (allow:) of the resources the plan covers, by address: shown in bold, never silently.
    allowed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    hosts: dict[str, str] = field(default_factory=dict)  # host name -> URI, for a project with [hosts]
    # Deletes this plan does not make because something on the host still uses the object (a running domain's
    # disk, an overlay's backing file), by address: why. A later plan deletes them once nothing uses them.
    waiting: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        add = sum(1 for c in self.changes if c.action is Action.CREATE or c.action.is_replace())
        change = sum(1 for c in self.changes if c.action is Action.UPDATE)
        destroy = sum(1 for c in self.changes if c.action is Action.DELETE or c.action.is_replace())
        counts = {"add": add, "change": change, "destroy": destroy}
        moves = sum(1 for c in self.changes if c.action is Action.MIGRATE)
        if moves:
            counts["move"] = moves
        return counts

    @property
    def empty(self) -> bool:
        return not self.changes

    def to_json(self, mask: bool = True) -> dict[str, Any]:
        """The plan as JSON-able data (schema: vmform/schemas/plan.schema.json); ``from_json`` reads it back.
        Sensitive values are masked, except in a saved plan file (``mask=False``): apply needs them."""

        def change_json(change: Change) -> dict[str, Any]:
            data = asdict(change)
            if mask:
                for side in ("before", "after"):
                    data[side] = mask_sensitive(change.kind, data[side])
            data["action"] = change.action.name.lower()
            data["symbol"] = change.action.value
            data["fields"] = [_field_json(change.kind, f) if mask else {**asdict(f), "effect": f.effect.value}
                              for f in change.fields]
            data["depends_on"] = list(change.depends_on)
            data["replug"] = list(change.replug)
            return data

        return {
            "format_version": PLAN_FORMAT_VERSION,
            "project": self.project,
            "host_uri": self.host_uri,
            "hosts": dict(self.hosts),
            "summary": self.counts(),
            "changes": [change_json(c) for c in self.changes],
            "notes": list(self.notes),
            "allowed": {address: list(names) for address, names in self.allowed.items()},
            "waiting": dict(self.waiting),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        """The Plan ``to_json`` wrote. Raises KeyError/ValueError/TypeError on a malformed document; the
        plan file reader (vmform.planfile) turns those into one clear error."""
        version = data.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise ValueError(f"plan format {version}, this vmform reads format {PLAN_FORMAT_VERSION}")
        return cls(
            project=data["project"],
            host_uri=data["host_uri"],
            changes=tuple(_change_from_json(c) for c in data["changes"]),
            notes=tuple(data.get("notes", ())),
            hosts=dict(data.get("hosts") or {}),
            allowed={str(address): tuple(names) for address, names in (data.get("allowed") or {}).items()},
            waiting={str(address): str(why) for address, why in (data.get("waiting") or {}).items()},
        )


def _change_from_json(data: dict[str, Any]) -> Change:
    fields = tuple(
        FieldChange(f["path"], f["before"], f["after"], Effect(f["effect"]), f.get("display_before", ""),
                    f.get("display_after", ""))
        for f in data.get("fields", ())
    )
    return Change(
        address=data["address"],
        kind=data["kind"],
        name=data["name"],
        action=Action[data["action"].upper()],
        host=data.get("host", "default"),
        before=data.get("before"),
        after=data.get("after"),
        fields=fields,
        reason=data.get("reason", ""),
        depends_on=tuple(data.get("depends_on", ())),
        live_name=data.get("live_name"),
        identity=dict(data.get("identity") or {}),
        restart=bool(data.get("restart", False)),
        replug=tuple(data.get("replug", ())),
        restart_allowed=bool(data.get("restart_allowed", False)),
    )
