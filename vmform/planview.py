"""A Plan as people read it: Terraform's symbols, field-level before -> after, and each change's effect."""

from __future__ import annotations

from vmform.diff import display
from vmform.plan import Action, Change, Plan
from vmform.schema.registry import KINDS
from vmform.schema.types import Effect

STYLE = {Action.CREATE: "green", Action.UPDATE: "yellow", Action.DELETE_THEN_CREATE: "magenta",
         Action.CREATE_THEN_DELETE: "magenta", Action.DELETE: "red", Action.MIGRATE: "cyan"}
HEADLINE = {
    Action.CREATE: "will be created",
    Action.UPDATE: "will be updated in place",
    Action.DELETE_THEN_CREATE: "must be replaced",
    Action.CREATE_THEN_DELETE: "must be replaced (the new one is created first)",
    Action.DELETE: "will be destroyed",
    Action.MIGRATE: "will be migrated",
}
EFFECT_NOTE = {
    Effect.LIVE: "live",
    Effect.RESTART: "at next restart",
    Effect.REPLACE: "forces replacement",
}
HIDDEN_CREATE_FIELDS = {"source_sha256"}


def _escape(text: str) -> str:
    return text.replace("[", "\\[")


def summary_line(plan: Plan) -> str:
    counts = plan.counts()
    moves = f", {counts['move']} to move" if counts.get("move") else ""
    return f"Plan: {counts['add']} to add, {counts['change']} to change, {counts['destroy']} to destroy{moves}."


def _allowed(plan: Plan) -> list[tuple[str, str]]:
    """(headline, explanation) per resource that opts in to what vmform refuses by default (allow:)."""
    from vmform.schema.kind import OPT_IN_DOCS

    lines = []
    for address, names in plan.allowed.items():
        roots = [name.split(" ", 1)[1] for name in names if name.startswith("pool_roots ")]
        if roots:  # vmform.toml's widening of the pool roots (api.PROJECT_ALLOWED)
            lines.append((f"{address} widens the pool roots: {', '.join(roots)}",
                          "pools may be made there without allow: [host_paths]"))
            continue
        lines.append((f"{address} is allowed: {', '.join(names)}",
                      "; ".join(f"{name}: {OPT_IN_DOCS.get(name, name)}" for name in names)))
    return lines


def allowed_lines(plan: Plan) -> list[str]:
    """One bold line per opted-in resource, in rich markup."""
    return [f"[bold]{_escape(head)}[/bold] ({_escape(what)})" for head, what in _allowed(plan)]


def _allowed_markdown(plan: Plan) -> list[str]:
    return [f"- **{head}** ({_cell(what)})" for head, what in _allowed(plan)]


def _change_lines(change: Change, allowed: tuple[str, ...] = ()) -> list[str]:
    style = STYLE[change.action]
    symbol = change.action.value
    headline = HEADLINE[change.action]
    if (change.action.is_replace() or change.action in (Action.MIGRATE, Action.DELETE)) and change.reason:
        headline += f" ({change.reason})"
    if change.restart:
        headline += ", and [bold]restarted[/bold]" if change.kind == "domain" else ", and [bold]restarted[/bold]"
        if change.replug:
            headline += f" (re-plugging the interfaces of {', '.join(change.replug)})"
    elif change.replug:  # a network started again: the running guests' interfaces go back on its bridge
        headline += f" (re-plugging the interfaces of {', '.join(change.replug)})"
    elif change.restart_allowed and _detaches(change):
        headline += " (restarted if its guest does not release a detached device)"
    if allowed:
        headline += f" [bold](allowed: {_escape(', '.join(allowed))})[/bold]"
    lines = [f"  [bold]# {change.address}[/bold] {headline}"]
    kind = KINDS.get(change.kind)
    if change.action is Action.DELETE:
        lines.append(f"  [{style}]{_escape(symbol)} {change.kind} \"{_escape(change.name)}\"[/{style}]")
        return lines
    lines.append(f"  [{style}]{_escape(symbol)}[/{style}] {change.kind} \"{_escape(change.name)}\" {{")
    if change.action is Action.CREATE:
        after = change.after or {}
        width = max((len(k) for k in after), default=0)
        for key, value in after.items():
            if key in HIDDEN_CREATE_FIELDS or value in (None, [], ""):
                continue
            spec = kind.spec(key) if kind else None
            lines.append(f"      [green]+[/green] {key.ljust(width)} = {_escape(display(spec, value))}")
    else:
        width = max((len(f.path) for f in change.fields), default=0)
        for field in change.fields:
            top = field.path.split("[", 1)[0]
            if field.before is None:
                mark, text = "[green]+[/green]", field.display_after
            elif field.after is None:
                mark, text = "[red]-[/red]", field.display_before
            else:
                mark, text = "[yellow]~[/yellow]", f"{field.display_before} -> {field.display_after}"
            effect = EFFECT_NOTE[field.effect]
            if field.effect is Effect.LIVE and change.before is not None and change.before.get("state") == "stopped" and change.kind == "domain" and top != "state":
                effect = "domain is stopped"
            if change.action is Action.MIGRATE:  # done when apply ends, either way
                effect = "live move" if change.identity.get("running") else "cold move"
            lines.append(f"      {mark} {_escape(field.path.ljust(width))} = {_escape(text)}  [dim]({effect})[/dim]")
    lines.append("    }")
    return lines


def _detaches(change: Change) -> bool:
    """Whether the change hot-unplugs a device from the running domain (which a guest may not release)."""
    return any(f.effect is Effect.LIVE and f.after is None and f.path.split("[", 1)[0] in ("disks", "interfaces")
               for f in change.fields)


def plan_lines(plan: Plan) -> list[str]:
    """Rich-markup lines; the console strips the markup when colour is off."""
    if plan.empty:
        return ["[green]No changes.[/green] The host matches the manifests.", *allowed_lines(plan),
                *(_escape(n) for n in plan.notes)]
    if plan.hosts:
        lines = [f"vmform will perform the following actions on the hosts of project {_escape(plan.project)}:", ""]
        for host, uri in plan.hosts.items():
            mine = [change for change in plan.changes if change.host == host]
            if not mine:
                continue
            lines += [f"[bold underline]host {_escape(host)}[/bold underline] ({_escape(uri)})", ""]
            for change in mine:
                lines.extend(_change_lines(change, plan.allowed.get(change.address, ())))
                lines.append("")
    else:
        lines = [f"vmform will perform the following actions on {_escape(plan.host_uri)}:", ""]
        for change in plan.changes:
            lines.extend(_change_lines(change, plan.allowed.get(change.address, ())))
            lines.append("")
    lines.extend(allowed_lines(plan))
    restarting = [c.address for c in plan.changes if c.restart]
    if restarting:  # what apply plans to restart; its summary says what it did restart
        lines.append(f"[bold yellow]Restarts planned:[/bold yellow] {', '.join(restarting)}")
    waiting = [c.address for c in plan.changes if c.waits_for_restart]
    if waiting:
        lines.append(f"[yellow]Changes waiting for a restart:[/yellow] {', '.join(waiting)} "
                     "(not restarted by this apply; use apply --restart or restart_policy: allowed)")
    for note in plan.notes:
        lines.append(_escape(note))
    lines.append(f"[bold]{summary_line(plan)}[/bold]")
    return lines


def _plain(markup: str) -> str:
    from rich.text import Text

    return Text.from_markup(markup).plain


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


ACTION_WORDS = {
    Action.CREATE: "create",
    Action.UPDATE: "update in place",
    Action.DELETE_THEN_CREATE: "replace",
    Action.CREATE_THEN_DELETE: "replace (create first)",
    Action.DELETE: "destroy",
    Action.MIGRATE: "migrate",
}


def plan_markdown(plan: Plan) -> str:
    """A summary for a pull-request comment: counts, one table row per change, each change's details
    collapsed in a <details> block."""
    where = ", ".join(f"{host} (`{uri}`)" for host, uri in plan.hosts.items()) if plan.hosts else f"`{plan.host_uri}`"
    title = f"### vmform plan for `{plan.project}` on {where}"
    if plan.empty:
        lines = [title, "", "**No changes.** The host matches the manifests."]
        lines += _allowed_markdown(plan)
        lines += [f"- {note}" for note in plan.notes]
        return "\n".join(lines) + "\n"
    lines = [title, "", f"**{summary_line(plan)}**", "", "| | resource | action | effect | why |", "|---|---|---|---|---|"]
    for change in plan.changes:
        effects = sorted({f.effect.value for f in change.fields})
        if change.restart:
            effects.append("restarted by apply")
        elif change.waits_for_restart:
            effects.append("waits for a restart")
        why = change.reason if change.action.is_replace() or change.action is Action.MIGRATE \
            else ", ".join(f.path for f in change.fields)
        if change.address in plan.allowed:
            why = f"**allowed: {', '.join(plan.allowed[change.address])}** " + why
        resource = f"`{change.address}`" + (f" on {change.host}" if plan.hosts else "")
        lines.append(f"| `{change.action.value}` | {resource} | {ACTION_WORDS[change.action]} | "
                     f"{_cell(', '.join(effects))} | {_cell(why)} |")
    lines.append("")
    for change in plan.changes:
        lines.append(f"<details><summary><code>{change.address}</code> {ACTION_WORDS[change.action]}</summary>")
        lines += ["", "```diff", *(_plain(line)[2:].rstrip() for line in _change_lines(change)), "```", "", "</details>"]
    if plan.notes or plan.allowed:
        lines.append("")
        lines += _allowed_markdown(plan)
        lines += [f"- {note}" for note in plan.notes]
    return "\n".join(lines) + "\n"
