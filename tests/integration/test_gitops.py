"""examples/gitops on the real daemon: the command sequence its pipelines run (examples/gitops/ci/vmform-ci.sh,
called by both github-actions.yml and gitlab-ci.yml), on a copy of the project with vmftest- names.

Covers: check offline, plan with a markdown comment and a saved plan, apply of exactly that plan, the
nightly drift check, refusal of a stale plan (host changed, manifests changed), of a plan for another
project or host or format, and the project lock between two applies: the second waits --lock-timeout,
then fails naming the holder; a lock whose holder may run is removed with force-unlock, and one left by a
process killed on this machine is removed by the next apply or destroy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jsonschema

from vmform.planfile import content_digest, plan_json_schema

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gitops"
URI = os.environ.get("VMFORM_TEST_URI", "qemu:///system")


def _setup(project: Any) -> Path:
    """The example project, renamed into this test's namespace (names, bridge, subnet, pool directory)."""
    p = project.prefix
    text = (EXAMPLE / "main.yaml").read_text()
    text = text.replace("gitops-", f"{p}-").replace("vmfgitops0", f"{project.bridge_prefix}g")
    text = text.replace("/var/lib/vmform/gitops", str(project.pool_dir)).replace("10.232.0.", f"{project.subnet}.")
    (project.root / "main.yaml").write_text(text)
    shutil.copytree(EXAMPLE / "ci", project.root / "ci")
    return project.root / "ci" / "vmform-ci.sh"


def _ci(project: Any, script: Path, step: str, **env: str) -> subprocess.CompletedProcess[str]:
    """One pipeline step, as CI runs it (no terminal, no colour)."""
    environment = {**os.environ, "VMFORM": f"{sys.executable} -m vmform -C {project.root}", "LOCK_TIMEOUT": "0", **env}
    return subprocess.run(["bash", str(script), step], cwd=project.root, capture_output=True, text=True,
                          env=environment, stdin=subprocess.DEVNULL, timeout=300)


HOLDER = """
import sys, time
from vmform.connection import open_connection
from vmform.ownership import ProjectLock
lock = ProjectLock(open_connection(sys.argv[1]), sys.argv[2], "apply")
lock.acquire()
print(lock.lock_id, flush=True)
time.sleep(float(sys.argv[3]))
lock.release()
print("released", flush=True)
"""


@contextmanager
def lock_holder(project: Any, seconds: float) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Another process holding the project lock, as a running apply would, for ``seconds``."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, URI, project.prefix, str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        lock_id = holder.stdout.readline().strip()
        assert lock_id, "the holder could not take the lock"
        yield holder, lock_id
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()


def test_gitops_pipeline_sequence(project: Any, conn: Any) -> None:
    p = project.prefix
    script = _setup(project)
    domain, network = f"domain.{p}-vm", f"network.{p}-net"

    # merge request: check (offline), then plan -> markdown comment + saved plan + JSON
    check = _ci(project, script, "check")
    assert check.returncode == 0, check.stderr
    assert "Valid: 4 resources" in check.stdout
    planned = _ci(project, script, "plan")
    assert planned.returncode == 0, planned.stderr
    markdown = (project.root / "plan.md").read_text()
    assert "**Plan: 4 to add, 0 to change, 0 to destroy.**" in markdown
    assert f"| `+` | `{domain}` | create |" in markdown
    assert markdown.count("<details>") == 4
    plan_json = json.loads((project.root / "plan.json").read_text())
    jsonschema.validate(plan_json, plan_json_schema())
    assert [c["address"] for c in plan_json["changes"]][-1] == domain
    shown = project.run("show", str(project.root / "vmform.plan"), check=True).stdout
    assert shown.startswith(f"# plan of project {p} for ") and "Plan: 4 to add, 0 to change, 0 to destroy." in shown
    assert conn.listAllDomains() and not any(d.name().startswith(p) for d in conn.listAllDomains()), \
        "plan must not change the host"

    # main: apply exactly the saved plan, no prompt
    applied = _ci(project, script, "apply")
    assert applied.returncode == 0, applied.stderr
    assert "Apply complete! Resources: 4 added, 0 changed, 0 destroyed." in applied.stdout
    assert conn.lookupByName(f"{p}-vm").isActive()
    drift = _ci(project, script, "drift")
    assert drift.returncode == 0, drift.stdout + drift.stderr
    assert "**No changes.**" in drift.stdout

    # nightly: someone changes the host by hand -> drift, exit 2
    conn.lookupByName(f"{p}-vm").setAutostart(1)
    drift = _ci(project, script, "drift")
    assert drift.returncode == 2, drift.stdout + drift.stderr
    assert f"`{domain}`" in drift.stdout and "autostart" in drift.stdout

    # a plan made now, then the host changes again before it is applied: refused, nothing done
    assert _ci(project, script, "plan").returncode == 0
    conn.networkLookupByName(f"{p}-net").setAutostart(0)
    stale = _ci(project, script, "apply")
    assert stale.returncode == 1
    assert stale.stderr.strip() == (f"Error: plan is stale: {network} changed on the host since the plan was made; "
                                    "make a new plan")
    assert conn.lookupByName(f"{p}-vm").autostart() == 1, "a stale plan must not be applied in part"

    # the manifests change after the plan: refused too
    assert _ci(project, script, "plan").returncode == 0
    manifest = project.root / "main.yaml"
    manifest.write_text(manifest.read_text().replace("memory: 64MiB", "memory: 96MiB"))
    stale = _ci(project, script, "apply")
    assert stale.returncode == 1
    assert "plan is stale: the manifests or vmform.toml changed since the plan was made" in stale.stderr

    # a plan limited to one target is applied exactly: the other drift stays
    network_plan = str(project.root / "network.plan")
    targeted = project.run("-q", "plan", "--target", network, "-out", network_plan, check=True)
    assert targeted.stdout == "Plan: 0 to add, 1 to change, 0 to destroy.\n"
    quiet = project.run("-q", "apply", network_plan, check=True)
    assert quiet.stdout == "Apply complete! Resources: 0 added, 1 changed, 0 destroyed.\n"
    assert conn.networkLookupByName(f"{p}-net").autostart() == 1
    assert conn.lookupByName(f"{p}-vm").autostart() == 1, "apply of a saved plan must not re-plan"

    # the rest through the pipeline again: plan, apply, in sync
    assert _ci(project, script, "plan").returncode == 0
    saved = json.loads((project.root / "plan.json").read_text())
    assert {(c["address"], c["action"]) for c in saved["changes"]} == {(domain, "update")}
    assert {f["path"] for f in saved["changes"][0]["fields"]} == {"autostart", "memory"}
    applied = _ci(project, script, "apply")
    assert applied.returncode == 0, applied.stderr
    assert conn.lookupByName(f"{p}-vm").autostart() == 0
    assert _ci(project, script, "drift").returncode == 0

    # the same plan file again: it was made from a host that has changed since (by its own apply)
    again = _ci(project, script, "apply")
    assert again.returncode == 1 and f"{domain} changed on the host" in again.stderr

    project.run("destroy", "--auto-approve", check=True)
    assert project.leftovers() == []


def _wait_for_lock(conn: Any, project: Any, seconds: float = 20) -> None:
    import libvirt

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, f"vmform/{project.prefix}/lock")
            return
        except libvirt.libvirtError:
            time.sleep(0.05)
    raise AssertionError("the first apply never took the lock")


def test_second_apply_waits_for_the_lock_then_fails_naming_the_holder(project: Any, conn: Any) -> None:
    import getpass
    import socket

    p = project.prefix
    script = _setup(project)
    assert _ci(project, script, "plan").returncode == 0
    assert _ci(project, script, "apply").returncode == 0
    manifest = project.root / "main.yaml"
    manifest.write_text(manifest.read_text().replace("state: running", "state: stopped"))
    assert _ci(project, script, "plan").returncode == 0

    # Two applies of the same plan at once. The first holds the lock while the guest (no OS: it ignores the
    # ACPI request) gets its shutdown_timeout of 5 s; the second waits 2 s for it, then fails naming it.
    first = subprocess.Popen([sys.executable, "-m", "vmform", "-C", str(project.root), "apply", "vmform.plan"],
                             cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})
    try:
        _wait_for_lock(conn, project)
        started = time.monotonic()
        second = _ci(project, script, "apply", LOCK_TIMEOUT="2")
        waited = time.monotonic() - started
        assert first.poll() is None, "the first apply should still hold the lock"
        assert second.returncode == 1
        assert 2 <= waited < 10
        waiting_line, message = second.stderr.strip().splitlines()
        assert waiting_line.startswith(f"Waiting up to 2s for the lock of project {p}, held by "), waiting_line
        assert message.startswith(f"Error: project {p} is locked (waited 2s): held by {getpass.getuser()} on "
                                  f"{socket.gethostname()} (pid {first.pid}, apply (saved plan)) since 20"), message
        assert "If that process is gone, remove the lock with: vmform force-unlock " in message
        assert "Traceback" not in second.stderr
        assert project.run("plan").code == 0, "plan takes no lock"
        # A second apply that waits long enough gets the lock, and finds its plan stale: the first one
        # changed the host the plan was made from.
        third = _ci(project, script, "apply", LOCK_TIMEOUT="60")
        assert third.returncode == 1
        assert f"plan is stale: domain.{p}-vm changed on the host since the plan was made" in third.stderr
    finally:
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, out + err
    assert not conn.lookupByName(f"{p}-vm").isActive()

    # A holder that may still be running keeps its lock until force-unlock removes it (by its id).
    manifest.write_text(manifest.read_text().replace("state: stopped", "state: running"))
    assert _ci(project, script, "plan").returncode == 0
    with lock_holder(project, 120) as (holder, lock_id):
        # SIGTERM (a cancelled CI job) while waiting: exits like Ctrl-C and leaves the holder's lock alone.
        waiting = subprocess.Popen([sys.executable, "-m", "vmform", "-C", str(project.root), "apply",
                                    "--lock-timeout", "60", "vmform.plan"], cwd=project.root, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        time.sleep(2)
        waiting.send_signal(signal.SIGTERM)
        _out, err = waiting.communicate(timeout=30)
        assert waiting.returncode == 130 and "Interrupted." in err
        started = time.monotonic()
        blocked = _ci(project, script, "apply")
        assert blocked.returncode == 1 and time.monotonic() - started < 10
        assert f"(pid {holder.pid}, apply)" in blocked.stderr and f"lock id {lock_id}" in blocked.stderr
        wrong = project.run("force-unlock", "00000000-0000-0000-0000-000000000000")
        assert wrong.code == 1 and "does not match the current lock" in wrong.stderr
        unlocked = project.run("force-unlock", lock_id, check=True)
        assert f"Removed the lock of project {p}" in unlocked.stdout
        assert project.run("force-unlock", lock_id).stderr.strip() == f"Error: project {p} is not locked"
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    # A holder that finishes within the timeout: the second apply waits, then runs.
    with lock_holder(project, 2):
        started = time.monotonic()
        applied = _ci(project, script, "apply", LOCK_TIMEOUT="60")
        assert applied.returncode == 0, applied.stderr
        assert time.monotonic() - started >= 1
    assert conn.lookupByName(f"{p}-vm").isActive()
    # A holder killed with the lock held (on this machine): the next apply or destroy removes its lock and says so.
    with lock_holder(project, 120) as (holder, lock_id):
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    destroyed = project.run("destroy", "--auto-approve", check=True)
    assert f"Removed a stale lock of project {p}: held by " in destroyed.stderr
    assert f"lock id {lock_id}, but process {holder.pid} is no longer running" in destroyed.stderr
    assert project.leftovers() == []


def test_plan_for_another_project_host_or_format_is_refused(project: Any, conn: Any, tmp_path_factory: Any) -> None:
    script = _setup(project)
    assert _ci(project, script, "plan").returncode == 0
    plan_file = project.root / "vmform.plan"
    data = json.loads(plan_file.read_text())
    assert data["kind"] == "vmform-plan" and data["host"]["uuid"]

    other = tmp_path_factory.mktemp("other")
    (other / "vmform.toml").write_text((project.root / "vmform.toml").read_text().replace(
        f'name = "{project.prefix}"', f'name = "{project.prefix}-other"'))
    shutil.copy(project.root / "main.yaml", other / "main.yaml")
    refused = subprocess.run(
        [sys.executable, "-m", "vmform", "-C", str(other), "apply", str(plan_file)], capture_output=True, text=True,
        env={**os.environ, "NO_COLOR": "1"}, stdin=subprocess.DEVNULL)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"Error: this plan was made for project {project.prefix}, not {project.prefix}-other"

    foreign = dict(data, host={**data["host"], "uuid": "00000000-1111-2222-3333-444444444444", "hostname": "elsewhere"})
    foreign["digest"] = content_digest(foreign)  # as a plan made on that host carries it
    (project.root / "foreign.plan").write_text(json.dumps(foreign))
    refused = project.run("apply", str(project.root / "foreign.plan"))
    assert refused.code == 1
    assert "this plan was made for host elsewhere (host UUID 00000000-1111-2222-3333-444444444444" in refused.stderr

    for version, expected in ((data["format_version"] + 1, "was written by a newer vmform"),
                              (0, "make the plan again with vmform plan -out")):
        (project.root / "versioned.plan").write_text(json.dumps(dict(data, format_version=version)))
        refused = project.run("apply", str(project.root / "versioned.plan"))
        assert refused.code == 1 and expected in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    assert not any(d.name().startswith(project.prefix) for d in conn.listAllDomains())


def test_a_hand_edited_plan_file_is_refused_before_any_change(project: Any, conn: Any) -> None:
    """Changing a network's bridge in a saved plan used to create a bridge of the new name; now the edit is
    found before anything is done: by the digest, and, when the digest was recomputed too, because the changes
    are not the plan the manifests and the host give."""
    script = _setup(project)
    assert _ci(project, script, "plan").returncode == 0
    plan_file = project.root / "vmform.plan"
    data = json.loads(plan_file.read_text())
    network = next(c for c in data["plan"]["changes"] if c["kind"] == "network")
    network["after"]["bridge"] = "vmfevil0"
    (project.root / "edited.plan").write_text(json.dumps(data))
    refused = project.run("apply", str(project.root / "edited.plan"))
    assert refused.code == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "was edited or damaged since vmform wrote it (its digest does not match its content)" in refused.stderr
    data["digest"] = content_digest(data)
    (project.root / "edited.plan").write_text(json.dumps(data))
    refused = project.run("apply", str(project.root / "edited.plan"))
    assert refused.code == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"changes are not the plan its manifests and the host give now (network.{project.prefix}-net differ): " \
        "the file was edited" in refused.stderr, refused.stderr
    (project.root / "cut.plan").write_text(plan_file.read_text()[:-200])
    refused = project.run("apply", str(project.root / "cut.plan"))
    assert refused.code == 1 and "is not a vmform plan file (not JSON)" in refused.stderr, refused.stderr
    assert not any(d.name().startswith(project.prefix) for d in conn.listAllDomains())
    assert not any(n.name().startswith(project.prefix) for n in conn.listAllNetworks())
    applied = project.run("apply", str(plan_file), check=True)  # the untouched plan still applies
    assert "Apply complete!" in applied.stdout
