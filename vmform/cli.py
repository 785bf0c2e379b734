"""The vmform command: argument parsing and output only. Everything else is the library (vmform.api)."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from vmform.errors import ManifestErrors, PlanErrors, VmformError


class Output:
    """Where text goes: rich on a terminal, plain text otherwise (or with --no-color / NO_COLOR)."""

    def __init__(self, color: bool, quiet: bool = False) -> None:
        from rich.console import Console

        tty = sys.stdout.isatty()
        self.interactive = tty and not quiet  # progress lines and prompts only for a person at a terminal
        self.quiet = quiet
        self.console = Console(
            highlight=False, no_color=not color, force_terminal=tty and color, soft_wrap=True,
            emoji=False,
        )
        self.errors = Console(stderr=True, highlight=False, no_color=not color, soft_wrap=True, emoji=False)

    def line(self, text: str = "") -> None:
        if not self.quiet:
            self.console.print(text)

    def summary(self, text: str) -> None:
        """The final line of a command: printed even with --quiet."""
        self.console.print(text)

    def plain(self, text: str) -> None:
        self.console.out(text, highlight=False)


def _fail(out: Output | None, exc: VmformError) -> None:
    lines = [str(e) for e in exc.errors] if isinstance(exc, ManifestErrors | PlanErrors) else [str(exc)]
    for line in lines:
        click.echo(f"Error: {line}", err=True)
    sys.exit(1)


class VmformGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VmformError as exc:
            _fail(None, exc)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)


@click.group(cls=VmformGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-C", "directory", type=click.Path(file_okay=False), default=None,
              help="Run as if started in DIR (the project is found by walking up from there).")
@click.option("--no-color", is_flag=True, help="No colours (also: the NO_COLOR environment variable).")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and the final summary line.")
@click.version_option(package_name="vmform")
@click.pass_context
def main(ctx: click.Context, directory: str | None, no_color: bool, quiet: bool) -> None:
    """Declarative KVM/QEMU hosts: YAML manifests -> plan -> apply, through libvirt."""
    color = not no_color and not os.environ.get("NO_COLOR")
    ctx.obj = {"directory": directory, "out": Output(color, quiet), "var": [], "var_file": []}
    _terminate_like_interrupt()


def _remember(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> None:
    ctx.find_root().obj[str(param.name)].extend(values)


def variable_options(command: Any) -> Any:
    """-var NAME=VALUE and -var-file FILE, on every command that reads the manifests."""
    command = click.option("-var", "--var", "var", multiple=True, metavar="NAME=VALUE", expose_value=False,
                           callback=_remember, help="Set a variable (repeatable; overrides var files).")(command)
    return click.option("-var-file", "--var-file", "var_file", multiple=True, metavar="FILE", expose_value=False,
                        callback=_remember, type=click.Path(dir_okay=False),
                        help="Read variables from a YAML file (repeatable; later files override earlier).")(command)


def _terminate_like_interrupt() -> None:
    """A cancelled CI job gets SIGTERM: unwind as on Ctrl-C, so an apply stops starting changes and the
    project lock is released instead of being left for force-unlock."""
    import signal
    import threading

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def _workspace(ctx: click.Context) -> Any:
    from pathlib import Path

    from vmform.api import load_workspace
    from vmform.manifest.variables import VariableInputs

    inputs = VariableInputs([Path(f) for f in ctx.obj["var_file"]], list(ctx.obj["var"]))
    return load_workspace(ctx.obj["directory"], inputs)


def _print_plan(out: Output, plan: Any, output_format: str = "text", before_apply: bool = False) -> None:
    """The plan in the chosen format; with --quiet, its summary line only (and before an apply, nothing:
    the apply's own summary is the final line)."""
    from vmform.planview import plan_lines, plan_markdown, summary_line

    if output_format == "json":
        import json

        click.echo(json.dumps(plan.to_json(), indent=2, sort_keys=False))
    elif output_format == "markdown":
        click.echo(plan_markdown(plan), nl=False)
    elif out.quiet:
        if plan.empty or not before_apply:
            out.summary("No changes." if plan.empty else summary_line(plan))
    else:
        for line in plan_lines(plan):
            out.line(line)


FORMAT = click.Choice(["text", "json", "markdown"])


@main.command()
@variable_options
@click.option("--target", "targets", multiple=True, metavar="ADDRESS", help="Limit to ADDRESS and what it depends on.")
@click.option("--detailed-exitcode", is_flag=True, help="Exit 0: no changes, 1: error, 2: changes present.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (same as --format json; docs/JSON.md).")
@click.option("--format", "output_format", type=FORMAT, default="text", show_default=True,
              help="text for people, json for programs, markdown for a pull-request comment.")
@click.option("-out", "--out", "out_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Save the plan to FILE; vmform apply FILE applies exactly it.")
@click.option("--restart", is_flag=True, help="Plan as apply --restart would: restart-class changes restart their objects.")
@click.option("--skip-unreachable", is_flag=True,
              help="With several hosts: plan (and apply) the reachable ones, and say which were skipped.")
@click.pass_context
def plan(ctx: click.Context, targets: tuple[str, ...], detailed_exitcode: bool, as_json: bool, output_format: str,
         out_file: str | None, restart: bool, skip_unreachable: bool) -> None:
    """Show what apply would change on the host. Takes no lock."""
    from vmform import api, planfile

    out: Output = ctx.obj["out"]
    workspace = _workspace(ctx)
    connections = api.connect(workspace, skip_unreachable=skip_unreachable)
    try:
        if out_file is not None:
            saved = api.saved_plan(workspace, connections, list(targets), restart=restart)
            the_plan = saved.plan
        else:
            the_plan = api.plan(workspace, connections, list(targets), restart=restart)
    finally:
        connections.close()
    _print_plan(out, the_plan, "json" if as_json else output_format)
    if out_file is not None:
        planfile.write(out_file, saved)
        if output_format == "text" and not as_json:
            out.line(f"Saved the plan to {out_file}. To apply exactly it: vmform apply {out_file}")
    if detailed_exitcode and not the_plan.empty:
        sys.exit(2)


def _confirm(out: Output, what: str, auto_approve: bool) -> bool:
    if auto_approve:
        return True
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        raise VmformError(f"cannot ask whether to {what}: there is no terminal to ask on; pass --auto-approve "
                          "(or apply a saved plan: vmform plan -out FILE, then vmform apply FILE)")
    answer = click.prompt(f"Do you want to {what}? Only 'yes' will be accepted", default="", show_default=False)
    return str(answer).strip() == "yes"


PAST = {"+": "created", "~": "updated", "-/+": "replaced", "+/-": "replaced", "-": "destroyed", ">": "migrated"}
PRESENT = {"+": "creating", "~": "updating", "-/+": "replacing", "+/-": "replacing", "-": "destroying", ">": "migrating"}


def _names(addresses: list[str], limit: int = 5) -> str:
    shown = ", ".join(addresses[:limit])
    return shown + (f" and {len(addresses) - limit} more" if len(addresses) > limit else "")


def _run_apply(ctx: click.Context, workspace: Any, connections: Any, the_plan: Any, parallelism: int | None,
               command: str, lock_timeout: float = 0.0, saved: Any = None, force_off: bool | None = None) -> None:
    import signal
    import threading
    import time

    from rich.markup import escape

    from vmform import api

    out: Output = ctx.obj["out"]
    started: dict[str, float] = {}
    # A volume moving with its domain has a change on each host (created on the new, its old copy deleted).
    addresses = [change.address for change in the_plan.changes]
    on_two_hosts = {address for address in addresses if addresses.count(address) > 1}

    def progress(change: Any, event: str, detail: str) -> None:
        symbol = change.action.value
        label = f"{change.address} (host {change.host})" if change.address in on_two_hosts else change.address
        if event == "start":
            started[label] = time.monotonic()
            if not out.interactive:
                return
            out.line(f"{label}: {PRESENT[symbol]}...")
        elif event == "done":
            took = time.monotonic() - started.get(label, time.monotonic())
            out.line(f"[green]{label}: {PAST[symbol]}[/green] [dim]({took:.1f}s)[/dim]")
        elif event == "failed":
            out.line(f"[red]{label}: failed: {escape(detail)}[/red]")
        elif event == "skipped":
            out.line(f"[yellow]{label}: skipped ({escape(detail)})[/yellow]")
        elif event == "interrupted":
            out.line(f"[red]{label}: interrupted: {escape(detail)}[/red]")
        elif event == "waiting":
            out.line(f"[yellow]{label}: kept: {escape(detail)}[/yellow]")
        sys.stdout.flush()  # one line at a time, as it happens, also into a pipe (CI logs)

    def notice(text: str) -> None:
        click.echo(text, err=True)

    # Ctrl-C (or SIGTERM) while the lock is held: the first starts nothing more and lets the changes in flight
    # finish, then the lock is released and the summary says what was done; the second stops waiting for them.
    stop, abandon = threading.Event(), threading.Event()

    def interrupt(_signum: int, _frame: Any) -> None:
        if stop.is_set():
            abandon.set()
            return
        stop.set()
        try:
            click.echo("Interrupted: finishing the changes in flight, starting no more (again to stop waiting).",
                       err=True)
        except OSError:  # stderr is gone (a killed pipeline): a handler must not raise into apply
            pass

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, interrupt)
    try:
        if saved is not None:
            result = api.apply_saved(workspace, connections, saved, parallelism, progress, lock_timeout, stop, abandon,
                                     notice, force_off)
        else:
            result = api.apply_plan(workspace, connections, the_plan, parallelism, progress, lock_timeout, command,
                                    stop, abandon, notice, force_off)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    _report(out, the_plan, command, result, connections)


def _kept(the_plan: Any, command: str) -> dict[str, str]:
    """What a destroy plan keeps because something on the host still uses it (a destroy is incomplete then;
    an apply's plan says the same in its notes and is complete: a later apply deletes them)."""
    return dict(getattr(the_plan, "waiting", {}) or {}) if command == "destroy" else {}


def _report_restarts(out: Output, result: Any) -> None:
    """What apply really restarted, and what waits for a restart it did not make: from what the providers did,
    never from the plan (a change that failed before its restart restarted nothing)."""
    from rich.markup import escape

    if result.restarted:
        out.line(f"[bold yellow]Restarted by this apply:[/bold yellow] {', '.join(result.restarted)}")
    for address, what in result.waiting_for_restart.items():
        out.line(f"[yellow]Waiting for a restart:[/yellow] {address}: {escape(what)}")


def _report(out: Output, the_plan: Any, command: str, result: Any, connections: Any = None) -> None:
    """The final summary line, one line per error, the exit status; exits unless everything was done."""
    import os

    verb = "Destroy" if command == "destroy" else "Apply"
    for note in result.notes:
        click.echo(f"Warning: {note}", err=True)
    unreachable = dict(getattr(connections, "unreachable", {}) or {})
    if result.ok and unreachable:
        out.summary(f"[bold red]{verb} incomplete:[/bold red] {len(result.done)} done; hosts not reached: "
                    f"{', '.join(sorted(unreachable))}.")
        _fail_if_unreachable(connections)
    _report_restarts(out, result)
    kept = _kept(the_plan, command)
    if result.ok and not kept:
        summary = the_plan.counts()
        if command == "destroy":
            out.summary(f"[bold green]{verb} complete![/bold green] Resources: {summary['destroy']} destroyed.")
        else:
            moved = f", {summary['move']} moved" if summary.get("move") else ""
            out.summary(f"[bold green]{verb} complete![/bold green] Resources: {summary['add']} added, "
                        f"{summary['change']} changed, {summary['destroy']} destroyed{moved}.")
        return
    not_started = result.not_started
    dependents = len(result.skipped) - len(not_started)
    counts = f"{len(result.done)} done, {len(result.failed)} failed"
    if result.waiting or kept:
        counts += f", {len(result.waiting) + len(kept)} kept (still in use)"
    if result.interrupted:
        counts += f", {len(result.interrupted)} interrupted"
    counts += f", {dependents} skipped" if not (result.stopped or result.lost_connection) else \
        f", {dependents} skipped, {len(not_started)} not started"
    if result.refused:
        counts += f", {result.refused} mutation{'s' if result.refused != 1 else ''} refused (internal error)"
    state = "interrupted" if result.stopped or result.abandoned else "incomplete"
    out.summary(f"[bold red]{verb} {state}:[/bold red] {counts}.")
    for address, message in result.failed.items():
        click.echo(f"Error: {address}: {message}", err=True)
    for address, message in [*result.waiting.items(), *kept.items()]:
        click.echo(f"Error: {address}: not destroyed: {message}", err=True)
    for address, message in result.mismatched.items():
        click.echo(f"Error: {address}: read back after apply, it differs from the plan: {message}", err=True)
    if result.lost_connection is not None:
        parts = [f"{len(result.done)} done"]
        if result.interrupted:
            parts.append(f"interrupted (unknown until the next plan): {_names(list(result.interrupted))}")
        if not_started:
            parts.append(f"not started: {_names(not_started)}")
        click.echo(f"Error: {result.lost_connection}; {'; '.join(parts)}. Run vmform {command} again once libvirtd "
                   "is back.", err=True)
    else:
        for address, message in result.interrupted.items():
            click.echo(f"Error: {address}: interrupted: {message}", err=True)
    if result.stopped or result.abandoned:
        sys.stdout.flush()
        sys.stderr.flush()
        if result.abandoned:
            from vmform import api

            api.release_held()  # os._exit leaves no ``with`` block: the lock goes first
            os._exit(130)  # the abandoned calls' threads are not waited for
        sys.exit(130)
    sys.exit(1)


@main.command()
@variable_options
@click.argument("plan_file", required=False, type=click.Path(dir_okay=False), metavar="[PLAN_FILE]")
@click.option("--auto-approve", is_flag=True, help="Do not ask for confirmation.")
@click.option("--parallelism", type=click.IntRange(1, 64), default=None, help="Changes made at once (default: vmform.toml).")
@click.option("--target", "targets", multiple=True, metavar="ADDRESS", help="Limit to ADDRESS and what it depends on.")
@click.option("--restart", is_flag=True,
              help="Restart domains and networks whose restart-class changes need it (clean shutdown first).")
@click.option("--lock-timeout", type=click.FloatRange(0), default=0.0, show_default=True, metavar="SECONDS",
              help="Wait this long for the project lock held by another apply or destroy, then fail.")
@click.option("--force-off", is_flag=True, default=None,
              help="Power off a domain that has not shut down within shutdown_timeout (default: force_off in "
                   "vmform.toml; without it such a change fails and the domain keeps running).")
@click.option("--wait-ip", is_flag=True,
              help="Afterwards, wait until every running domain on a DHCP network reports an IP address.")
@click.option("--wait-agent", is_flag=True,
              help="Afterwards, wait until the guest agent of every running domain with one has connected.")
@click.option("--wait-timeout", type=click.FloatRange(1, 3600), default=300.0, show_default=True, metavar="SECONDS",
              help="How long --wait-ip and --wait-agent wait (each).")
@click.option("--skip-unreachable", is_flag=True,
              help="With several hosts: plan (and apply) the reachable ones, and say which were skipped.")
@click.option("--journal", "journal_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write every libvirt mutation, with the planned change it serves, to FILE as JSON lines "
                   "(docs/JSON.md; VMFORM_JOURNAL=FILE appends).")
@click.pass_context
def apply(ctx: click.Context, plan_file: str | None, auto_approve: bool, parallelism: int | None,
          targets: tuple[str, ...], restart: bool, lock_timeout: float, force_off: bool | None, wait_ip: bool,
          wait_agent: bool, wait_timeout: float, skip_unreachable: bool, journal_file: str | None) -> None:
    """Plan, confirm, then make the host match the manifests.

    With PLAN_FILE (from vmform plan -out), apply exactly that plan without planning again or asking;
    it is refused when the manifests or the host changed since it was made."""
    from vmform import api, planfile

    out: Output = ctx.obj["out"]
    _journal_to(journal_file)
    saved = None
    if plan_file is not None:
        if targets or restart:
            raise VmformError("--target and --restart are decided when the plan is made (vmform plan -out), "
                              "not when a saved plan is applied")
        saved = planfile.read(plan_file)
    workspace = _workspace(ctx)
    connections = api.connect(workspace, skip_unreachable=skip_unreachable)
    try:
        if saved is not None:
            # The lock first: the saved plan is checked against the hosts as they are once nobody else changes them.
            with api.locked(workspace, connections, "apply (saved plan)", lock_timeout, _lock_notice):
                _print_plan(out, saved.plan, before_apply=True)
                if not saved.plan.empty:
                    _run_apply(ctx, workspace, connections, saved.plan, parallelism, "apply", lock_timeout, saved,
                               force_off or None)
                else:
                    api.check_saved(workspace, connections, saved)  # "nothing to do" must still be true now
            _wait_after_apply(out, workspace, connections, wait_agent, wait_ip, wait_timeout)
            return
        # The lock first, then read the hosts and plan: an apply that waited plans what the other one left.
        with api.locked(workspace, connections, "apply", lock_timeout, _lock_notice):
            the_plan = api.plan(workspace, connections, list(targets), restart=restart)
            _print_plan(out, the_plan, before_apply=True)
            if not the_plan.empty:
                if not _confirm(out, "apply these changes", auto_approve):
                    out.line("Apply cancelled.")
                    sys.exit(1)
                _run_apply(ctx, workspace, connections, the_plan, parallelism, "apply", lock_timeout,
                           force_off=force_off or None)
            else:
                _fail_if_unreachable(connections)
        _wait_after_apply(out, workspace, connections, wait_agent, wait_ip, wait_timeout)
        if workspace.manifests.outputs and not out.quiet:
            _print_outputs(out, api.project_outputs(workspace, connections))
    finally:
        connections.close()


def _lock_notice(text: str) -> None:
    """Waiting for the lock, a stale lock removed, a lock left behind: one line on stderr."""
    click.echo(text, err=True)


def _journal_to(path: str | None) -> None:
    """apply/destroy --journal FILE: the journal of this run, as JSON lines (written as the calls are made)."""
    if path is not None:
        from vmform.journal import JOURNAL

        try:
            JOURNAL.write_to(path)
        except OSError as exc:
            raise VmformError(f"--journal {path}: {exc.strerror or exc}") from None


def _fail_if_unreachable(connections: Any) -> None:
    """apply/destroy --skip-unreachable: the hosts left out make the command incomplete (exit 1)."""
    unreachable = dict(getattr(connections, "unreachable", {}) or {})
    for host in sorted(unreachable):
        click.echo(f"Error: {unreachable[host]}: its resources were not planned or applied", err=True)
    if unreachable:
        sys.exit(1)


def _wait_after_apply(out: Output, workspace: Any, connections: Any, agent: bool, ip: bool, timeout: float) -> None:
    if agent:
        _wait_for_agents(out, workspace, connections, timeout)
    if ip:
        _wait_for_addresses(out, workspace, connections, timeout)


def _wait_for_agents(out: Output, workspace: Any, connections: Any, timeout: float) -> None:
    from vmform import api

    awaited = api.awaited_agents(workspace)
    if not awaited:
        out.line("No running domain with a guest agent channel: no agent to wait for.")
        return
    out.line(f"Waiting up to {timeout:.0f}s for the guest agents of {', '.join(awaited)}...")
    api.wait_for_agents(workspace, connections, timeout, lambda address: out.line(f"{address}: guest agent connected"))


def _wait_for_addresses(out: Output, workspace: Any, connections: Any, timeout: float) -> None:
    from vmform import api

    def reported(output: Any) -> None:
        out.line(f"{output.address}: {', '.join(a.ip for a in output.addresses)}")

    awaited = api.awaited_domains(workspace)
    if not awaited:
        out.line("No running domain on a network with DHCP: no IP address to wait for.")
        return
    out.line(f"Waiting up to {timeout:.0f}s for the IP addresses of {', '.join(awaited)}...")
    api.wait_for_addresses(workspace, connections, timeout, reported)


@main.command()
@variable_options
@click.option("--auto-approve", is_flag=True, help="Do not ask for confirmation.")
@click.option("--parallelism", type=click.IntRange(1, 64), default=None, help="Changes made at once (default: vmform.toml).")
@click.option("--target", "targets", multiple=True, metavar="ADDRESS", help="Only ADDRESS and what uses it.")
@click.option("--lock-timeout", type=click.FloatRange(0), default=0.0, show_default=True, metavar="SECONDS",
              help="Wait this long for the project lock held by another apply or destroy, then fail.")
@click.option("--skip-unreachable", is_flag=True,
              help="With several hosts: plan (and apply) the reachable ones, and say which were skipped.")
@click.option("--journal", "journal_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write every libvirt mutation, with the planned change it serves, to FILE as JSON lines "
                   "(docs/JSON.md; VMFORM_JOURNAL=FILE appends).")
@click.pass_context
def destroy(ctx: click.Context, auto_approve: bool, parallelism: int | None, targets: tuple[str, ...],
            lock_timeout: float, skip_unreachable: bool, journal_file: str | None) -> None:
    """Remove every object this project owns on the host (and nothing else)."""
    from vmform import api

    out: Output = ctx.obj["out"]
    _journal_to(journal_file)
    workspace = _workspace(ctx)
    connections = api.connect(workspace, skip_unreachable=skip_unreachable)
    try:
        with api.locked(workspace, connections, "destroy", lock_timeout, _lock_notice):
            the_plan = api.destroy_plan(workspace, connections, list(targets))
            _print_plan(out, the_plan, before_apply=True)
            if the_plan.empty:
                _fail_if_unreachable(connections)
                if the_plan.waiting:  # nothing to destroy now, but not everything is gone: say what is kept
                    from vmform.apply import ApplyResult

                    _report(out, the_plan, "destroy", ApplyResult(), connections)
                return
            if not _confirm(out, "destroy these objects", auto_approve):
                out.line("Destroy cancelled.")
                sys.exit(1)
            _run_apply(ctx, workspace, connections, the_plan, parallelism, "destroy", lock_timeout)
    finally:
        connections.close()


@main.command()
@variable_options
@click.argument("addresses", nargs=-1)
@click.option("--no-argv", is_flag=True, help="Do not ask libvirt for the QEMU command line.")
@click.pass_context
def render(ctx: click.Context, addresses: tuple[str, ...], no_argv: bool) -> None:
    """Print the libvirt XML of resources (all when none named) and, for domains, the QEMU command line."""
    from vmform import api
    from vmform.render.validate import validate
    from vmform.render.xml import to_text
    from vmform.schema.types import did_you_mean

    out: Output = ctx.obj["out"]
    workspace = _workspace(ctx)
    resources = workspace.manifests.resources
    for address in addresses:
        if address not in resources:
            raise VmformError(f"no resource '{address}'{did_you_mean(address, list(resources))}")
    chosen = [resources[a] for a in (addresses or workspace.order)]
    connection = None
    for resource in chosen:
        kind = resource.kind.name
        if resource.values.get("existing"):
            out.line(f"[bold]# {resource.address}[/bold] [dim](existing: only used, vmform writes no XML for it)[/dim]")
            continue
        root = api.render(workspace, resource)
        validate(kind, root, resource.address)
        text = to_text(root)
        out.line(f"[bold]# {resource.address}[/bold]")
        out.plain(text)
        if kind == "domain" and not no_argv:
            if connection is None:
                from vmform.connection import open_connection

                connection = open_connection(workspace.project.uri)
            try:
                argv = connection.domainXMLToNative("qemu-argv", text, 0)
            except Exception as exc:  # noqa: BLE001 - shown to the user, not fatal
                from vmform.connection import libvirt_message

                out.line(f"[dim]# QEMU command line unavailable: {libvirt_message(exc)}[/dim]")
            else:
                out.line(f"[bold]# QEMU command line of {resource.address} (from libvirt)[/bold]")
                out.plain(argv.strip().replace(" -", " \\\n  -") + "\n")
    if connection is not None:
        connection.close()


@main.command()
@variable_options
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def output(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Each declared domain's state and IP addresses (DHCP leases, guest agent), and the project's outputs;
    with NAME, just that output's value."""
    import json

    from vmform import api

    out: Output = ctx.obj["out"]
    workspace = _workspace(ctx)
    if name is not None and name not in workspace.manifests.outputs:
        from vmform.schema.types import did_you_mean

        raise VmformError(f"no output '{name}'{did_you_mean(name, list(workspace.manifests.outputs))}")
    connections = api.connect(workspace)
    try:
        outputs = api.domain_outputs(workspace, connections)
        # One output asked for by name is printed as it is (as `terraform output NAME`); a listing masks.
        shown = api.project_outputs(workspace, connections, show_sensitive=name is not None)
    finally:
        connections.close()
    if name is not None:
        value = shown[name]
        click.echo(value if isinstance(value, str) else json.dumps(value))
        return
    if as_json:
        click.echo(json.dumps({"domains": [o.to_json() for o in outputs], "outputs": shown}, indent=2))
        return
    # Plain aligned columns, never truncated or wrapped (scripts read this too).
    rows = [("DOMAIN", "NAME", "STATE", "ADDRESSES")]
    for item in outputs:
        ips = ", ".join(f"{a.ip}/{a.prefix} ({a.source})" for a in item.addresses) or "-"
        rows.append((item.address, item.name, item.state, ips))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        out.plain("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])
    _print_outputs(out, shown)


def _print_outputs(out: Output, shown: dict[str, Any]) -> None:
    import json

    if shown:
        out.plain("")
        out.plain("Outputs:")
        for key, value in shown.items():
            out.plain(f"{key} = {value if isinstance(value, str) else json.dumps(value)}")


@main.command()
@variable_options
@click.option("--ini", "as_ini", is_flag=True, help="INI instead of YAML.")
@click.option("--list", "as_list", is_flag=True, help="Ansible dynamic-inventory JSON (ansible-inventory -i calls this).")
@click.option("--host", "host", default=None, metavar="NAME", help="Dynamic inventory: one host's variables as JSON.")
@click.pass_context
def inventory(ctx: click.Context, as_ini: bool, as_list: bool, host: str | None) -> None:
    """An Ansible inventory of the project's domains: addresses, groups (a domain's groups:)."""
    import json

    from vmform import api

    workspace = _workspace(ctx)
    connections = api.connect(workspace)
    try:
        hosts = api.inventory(workspace, connections)
    finally:
        connections.close()
    if host is not None:
        click.echo(json.dumps(hosts.hosts.get(host, {})))
    elif as_list:
        click.echo(hosts.to_dynamic())
    else:
        click.echo(hosts.to_ini() if as_ini else hosts.to_yaml(), nl=False)


@main.command()
@variable_options
@click.argument("address")
@click.option("-f", "--follow", is_flag=True, help="Keep printing what the guest writes (Ctrl-C stops).")
@click.option("-n", "--lines", type=click.IntRange(1), default=None, help="Only the last N lines.")
@click.option("--live", is_flag=True,
              help="Attach to the running guest's console through libvirt instead (read-only; remote hosts too; "
                   "Ctrl-C detaches).")
@click.pass_context
def console(ctx: click.Context, address: str, follow: bool, lines: int | None, live: bool) -> None:
    """Print a domain's serial console log (console_log; the host must be this machine), or with --live what the
    running guest writes from now on."""
    import time

    from vmform import api

    workspace = _workspace(ctx)
    connections = api.connect(workspace)
    try:
        if live:
            chunks = api.console_stream(workspace, connections, address)
            click.echo(f"Attached to {address}'s console (read-only; Ctrl-C detaches).", err=True)
            for chunk in chunks:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            return
        path = api.console_log_path(workspace, connections, address)
    finally:
        connections.close()
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise VmformError(f"{address}: no console log at {path} yet (the domain has not run since console_log was set)") from None
    except OSError as exc:
        raise VmformError(f"{address}: cannot read {path}: {exc.strerror}") from None
    with handle:
        data = handle.read()
        if lines is not None:
            data = b"\n".join(data.splitlines()[-lines:]) + (b"\n" if data else b"")
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        while follow:
            chunk = handle.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            else:
                time.sleep(0.25)


@main.command()
@variable_options
@click.pass_context
def validate(ctx: click.Context) -> None:
    """Check the manifests without connecting to libvirt: schema, references, cycles, and the XML they
    would render against libvirt's RNG schemas. Fast enough for a pre-commit hook."""
    from vmform import api

    out: Output = ctx.obj["out"]
    workspace = _workspace(ctx)
    api.validate(workspace)
    out.summary(f"[green]Valid:[/green] {len(workspace.manifests.resources)} resources in "
                f"{len(workspace.manifests.files)} files.")


@main.command()
@variable_options
@click.argument("args", nargs=-1, metavar="[PLAN_FILE | ADDRESS...]")
@click.option("--json", "as_json", is_flag=True, help="Print a saved plan as JSON (docs/JSON.md).")
@click.option("--sensitive", is_flag=True, help="Print sensitive values (cloud-init user-data) instead of their digest.")
@click.pass_context
def show(ctx: click.Context, args: tuple[str, ...], as_json: bool, sensitive: bool) -> None:
    """Print a saved plan (vmform plan -out FILE), or the desired values of resources (all when none named).
    Sensitive values are masked unless --sensitive."""
    from pathlib import Path

    import yaml

    from vmform import api, planfile

    out: Output = ctx.obj["out"]
    if len(args) == 1 and Path(args[0]).is_file():  # a plan file; anything else names resources
        saved = planfile.read(args[0])
        if not as_json:
            from rich.markup import escape

            out.line(f"[dim]# {escape(saved.describe())}[/dim]")
        _print_plan(out, saved.plan, "json" if as_json else "text")
        return
    if as_json:
        raise VmformError("--json applies to a saved plan file (vmform show FILE --json)"
                          + (f"; no such file: {args[0]}" if len(args) == 1 else ""))

    class _Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    _Dumper.add_representer(str, text)
    workspace = _workspace(ctx)
    for address, values in api.show_values(workspace, list(args), sensitive):
        out.line(f"[bold]# {address}[/bold]")
        out.plain(yaml.dump(values, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False))


@main.command("force-unlock")
@click.argument("lock_id")
@click.pass_context
def force_unlock(ctx: click.Context, lock_id: str) -> None:
    """Remove the project lock LOCK_ID left on the host by a killed apply or destroy.

    The ID is in the message of the apply that found the project locked; nothing is removed unless it
    names the current lock."""
    from vmform import api

    out: Output = ctx.obj["out"]
    workspace = _workspace(ctx)
    connections = api.connect(workspace)
    try:
        info = api.force_unlock(workspace, connections, lock_id)
    finally:
        connections.close()
    out.summary(f"Removed the lock of project {workspace.project.name} ({info.describe()}).")


@main.command()
@click.option("-o", "output", type=click.Path(dir_okay=False), default=None, help="Write to FILE instead of stdout.")
def schema(output: str | None) -> None:
    """Print the JSON Schema of manifests, for editors (YAML language server) and CI; see docs/MANIFEST.md."""
    import json

    from vmform.schema.jsonschema import manifest_schema

    text = json.dumps(manifest_schema(), indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        from pathlib import Path

        try:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise VmformError(f"cannot write {output}: {exc.strerror or exc}") from None


@main.command()
@variable_options
@click.option("--format", "output_format", type=click.Choice(["dot", "mermaid"]), default="dot", show_default=True)
@click.pass_context
def graph(ctx: click.Context, output_format: str) -> None:
    """Print the dependency graph of the manifests (no libvirt connection): an edge A -> B means B needs A."""
    from vmform.graph import to_dot, to_mermaid

    workspace = _workspace(ctx)
    render = to_dot if output_format == "dot" else to_mermaid
    click.echo(render(workspace.graph, workspace.project.name), nl=False)


@main.command()
@click.option("--check", is_flag=True, help="Change nothing; exit 1 and list the files that are not formatted.")
@click.option("--diff", "show_diff", is_flag=True, help="Print what would change as a unified diff.")
@click.pass_context
def fmt(ctx: click.Context, check: bool, show_diff: bool) -> None:
    """Rewrite the manifests in vmform's canonical layout, keeping comments (docs/MANIFEST.md, Formatting)."""
    from vmform.api import load_project_only
    from vmform.manifest.fmt import format_files

    out: Output = ctx.obj["out"]
    project = load_project_only(ctx.obj["directory"])
    results = format_files(project.manifest_files(), write=not check, root=project.root)
    changed = [r for r in results if r.changed]
    for result in changed:
        if show_diff:
            click.echo(result.diff(), nl=False)
        out.summary(f"{'would reformat' if check else 'reformatted'} {result.shown}")
    if check and changed:
        sys.exit(1)
    if not changed:
        out.line(f"{len(results)} manifest files already formatted.")


@main.command("import")
@variable_options
@click.argument("addresses", nargs=-1)
@click.option("--all", "take_all", is_flag=True, help="Every unmanaged domain, network and pool (see --filter).")
@click.option("--filter", "pattern", default="*", show_default=True, help="With --all: only names matching GLOB.")
@click.option("-o", "output", type=click.Path(dir_okay=False), default=None,
              help="Manifest file to write (default: imported.yaml in the project root).")
@click.option("--force", is_flag=True, help="Overwrite the output file.")
@click.pass_context
def import_(ctx: click.Context, addresses: tuple[str, ...], take_all: bool, pattern: str, output: str | None,
            force: bool) -> None:
    """Adopt existing unmanaged objects (domain.NAME, network.NAME, pool.NAME): write manifests, mark them owned."""
    from pathlib import Path

    from rich.markup import escape

    from vmform.connection import open_connection
    from vmform.importer import import_objects

    out: Output = ctx.obj["out"]
    if not addresses and not take_all:
        raise VmformError("name what to import (domain.NAME, network.NAME, pool.NAME) or pass --all")
    workspace = _workspace(ctx)
    conn = open_connection(workspace.project.uri)
    try:
        result = import_objects(workspace, conn, list(addresses), take_all, pattern,
                                Path(output) if output else None, force)
    finally:
        conn.close()
    for item in result.objects:
        out.line(f"[green]{item.address}: imported[/green]")
        for path in item.not_expressed:
            out.line(f"  not carried (libvirt fills it in; kept as it is on the host): {escape(path)}")
        for note in item.notes:
            out.line(f"  note: {escape(note)}")
    out.line(f"Wrote {result.output} ({len(result.objects)} objects, now owned by project {workspace.project.name}).")
    if result.outside_globs:
        out.line("[yellow]The file is outside the project's manifest patterns (vmform.toml): plan will not read it.[/yellow]")


if __name__ == "__main__":
    main()
