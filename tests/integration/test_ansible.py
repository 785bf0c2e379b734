"""The vmform Ansible module (ansible_collections/vmform/libvirt) with real ansible-core: examples/ansible/site.yml
run by ansible-playbook against the real daemon, on a copy of the example project with vmftest- names.

Covers: a first run creates everything (changed), a second changes nothing; drift made by hand is reported by a
check-mode run (changed, with the field-level diff) and left in place; state planned changes nothing; state absent
removes everything; a broken manifest fails the task with the file:line message vmform itself prints, never a
traceback; ansible-doc renders the module's documentation.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import URI

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "ansible"
BIN = Path(sys.executable).parent

RESULT_LINE = re.compile(r"^(ok|changed|fatal|skipping): \[localhost\](?:: FAILED!)? => (\{.*\})$")
TASK_LINE = re.compile(r"^TASK \[(.*)\] \*+$")
RECAP_LINE = re.compile(r"^localhost\s+:\s+(.*)$")


@dataclass
class PlaybookRun:
    code: int
    stdout: str
    stderr: str
    results: dict[str, dict[str, Any]]  # task name -> its result
    recap: dict[str, int]  # ok, changed, failed, ...
    recap_line: str

    @property
    def module(self) -> dict[str, Any]:
        return self.results["Apply the vmform project"]


def _ansible_env(project: Any) -> dict[str, str]:
    return {
        **os.environ,
        "ANSIBLE_COLLECTIONS_PATH": str(REPO),
        "ANSIBLE_HOME": str(project.root / ".ansible"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
        "ANSIBLE_CALLBACK_FORMAT_PRETTY": "false",  # each result on one line
        "ANSIBLE_DEPRECATION_WARNINGS": "false",
    }


def _playbook(project: Any, *args: str) -> PlaybookRun:
    """ansible-playbook examples/ansible/site.yml on this test's project, as the README runs it."""
    completed = subprocess.run(
        [str(BIN / "ansible-playbook"), "-v", str(EXAMPLE / "site.yml"), "-e", f"vmform_project={project.root}",
         "-e", f"ansible_python_interpreter={sys.executable}", *args],
        capture_output=True, text=True, env=_ansible_env(project), stdin=subprocess.DEVNULL, timeout=300,
    )
    results: dict[str, dict[str, Any]] = {}
    recap: dict[str, int] = {}
    recap_line = ""
    task = ""
    for line in completed.stdout.splitlines():
        if match := TASK_LINE.match(line):
            task = match.group(1)
        elif match := RESULT_LINE.match(line):
            results[task] = json.loads(match.group(2))
        elif match := RECAP_LINE.match(line):
            recap_line = line
            recap = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}
    assert recap, f"no PLAY RECAP\n{completed.stdout}\n{completed.stderr}"
    return PlaybookRun(completed.returncode, completed.stdout, completed.stderr, results, recap, recap_line)


def _setup(project: Any) -> None:
    """The example project, renamed into this test's namespace (names, bridge, subnet, pool directory); the
    fixture's vmform.toml names the project after the test."""
    p = project.prefix
    text = (EXAMPLE / "project" / "main.yaml").read_text()
    text = text.replace("ansible-", f"{p}-").replace("vmfansible0", f"{project.bridge_prefix}a")
    text = text.replace("/var/lib/vmform/ansible", str(project.pool_dir)).replace("10.233.0.", f"{project.subnet}.")
    (project.root / "main.yaml").write_text(text)


def test_playbook_first_second_drift_check_planned_absent(project: Any, conn: Any) -> None:
    p = project.prefix
    _setup(project)
    domain = f"domain.{p}-vm"

    first = _playbook(project)
    assert first.code == 0, first.stdout + first.stderr
    assert first.recap["changed"] == 1 and first.recap["failed"] == 0, first.recap_line
    result = first.module
    assert result["changed"] is True
    assert result["summary"] == {"add": 4, "change": 0, "destroy": 0}
    assert [(c["address"], c["action"]) for c in result["changes"]][-1] == (domain, "create")
    assert sorted(result["apply"]["done"]) == sorted(c["address"] for c in result["changes"])
    assert [(o["address"], o["name"], o["state"]) for o in result["outputs"]] == [(domain, f"{p}-vm", "running")]
    assert result["project_outputs"] == {"vm_state": "running", "disk": f"{project.pool_dir}/{p}-root"}
    assert conn.lookupByName(f"{p}-vm").isActive()
    assert conn.networkLookupByName(f"{p}-net").isActive()
    print(f"first run:  {first.recap_line}")

    second = _playbook(project)
    assert second.code == 0, second.stdout + second.stderr
    assert second.recap["changed"] == 0 and second.recap["failed"] == 0, second.recap_line
    assert second.module["changed"] is False
    assert second.module["summary"] == {"add": 0, "change": 0, "destroy": 0}
    assert second.module["changes"] == [] and "apply" not in second.module
    print(f"second run: {second.recap_line}")

    # drift made by hand: a check-mode run reports it, with the field-level diff, and leaves it in place
    conn.lookupByName(f"{p}-vm").setAutostart(1)
    check = _playbook(project, "--check", "--diff")
    assert check.code == 0, check.stdout + check.stderr
    assert check.recap["changed"] == 1 and check.recap["failed"] == 0, check.recap_line
    assert check.module["changed"] is True
    assert check.module["changes"] == [
        {"address": domain, "action": "update", "symbol": "~", "fields": ["autostart"], "reason": ""}]
    # the callback prints the diff (and drops it from the result it shows)
    assert f"--- before: {domain} (on the host)\n+++ after: {domain} (update)\n" in check.stdout
    assert "-autostart: true" in check.stdout and "+autostart: false" in check.stdout
    assert "apply" not in check.module
    assert conn.lookupByName(f"{p}-vm").autostart() == 1, "check mode must not touch the host"

    # state planned: the same plan, never a change
    planned = _playbook(project, "-e", "vmform_state=planned")
    assert planned.code == 0, planned.stdout + planned.stderr
    assert planned.recap["changed"] == 0, planned.recap_line
    assert planned.module["changed"] is False and planned.module["summary"] == {"add": 0, "change": 1, "destroy": 0}
    assert planned.module["plan"]["changes"][0]["fields"][0]["path"] == "autostart"
    assert conn.lookupByName(f"{p}-vm").autostart() == 1

    # state absent removes everything the project owns
    absent = _playbook(project, "-e", "vmform_state=absent")
    assert absent.code == 0, absent.stdout + absent.stderr
    assert absent.recap["changed"] == 1, absent.recap_line
    assert absent.module["summary"] == {"add": 0, "change": 0, "destroy": 4}
    assert absent.module["outputs"][0]["state"] == "absent"
    assert project.leftovers() == []


def test_broken_manifest_fails_with_the_file_line_message(project: Any) -> None:
    project.write("""
        networks:
          PFX-net: {mode: isolated, bridge: BRPb, ipv4: 10.9.9.1/24}
        pools:
          PFX-pool: {type: dir, path: /tmp/PFX}
        volumes:
          PFX-root: {pool: PFX-pool, size: 2GB}
          PFX-data: {pool: PFX-nope, size: 1GiB}
    """)
    expected = [line.removeprefix("Error: ") for line in project.run("validate").stderr.splitlines()]
    assert len(expected) == 2 and all(line.startswith("main.yaml:") for line in expected), expected

    failed = _playbook(project)
    assert failed.code != 0
    assert failed.recap["failed"] == 1 and failed.recap["changed"] == 0, failed.recap_line
    result = failed.module
    assert result["msg"] == "; ".join(expected)
    assert result["errors"] == expected
    assert "\n" not in result["msg"] and "Traceback" not in failed.stdout + failed.stderr
    assert "exception" not in result and "module_stderr" not in result

    # variables reach the manifests; an undeclared one is refused in one line
    (project.root / "main.yaml").write_text("variables:\n  count: {type: number, default: 0}\nnetworks: {}\n")
    code, refused = _adhoc(project, project_src=str(project.root), variables={"a": 1})
    assert code != 0 and refused["msg"] == "variable a: no variable 'a' is declared", refused["msg"]
    code, planned = _adhoc(project, project_src=str(project.root), variables={"count": 2}, state="planned")
    assert code == 0, planned

    code, out_of_range = _adhoc(project, project_src=str(project.root), parallelism=0)
    assert code != 0 and out_of_range["msg"] == "parallelism must be between 1 and 64, not 0"

    # uri overrides the project's (qemu:///system); a host that is not there is one line too
    code, unreachable = _adhoc(project, project_src=str(project.root), uri="qemu+unix:///system?socket=/nonexistent")
    assert code != 0 and unreachable["msg"].startswith("cannot connect to qemu+unix:///system?socket=/nonexistent: ")


def _adhoc(project: Any, **module_args: Any) -> tuple[int, dict[str, Any]]:
    """The module run by itself: ansible localhost -m vmform.libvirt.vmform -a JSON."""
    completed = subprocess.run(
        [str(BIN / "ansible"), "localhost", "-m", "vmform.libvirt.vmform", "-a", json.dumps(module_args),
         "-e", f"ansible_python_interpreter={sys.executable}"],
        capture_output=True, text=True, env=_ansible_env(project), stdin=subprocess.DEVNULL, timeout=120,
    )
    assert " => " in completed.stdout, completed.stdout + completed.stderr
    return completed.returncode, json.loads(completed.stdout.split(" => ", 1)[1])


def test_ansible_doc_renders_the_module() -> None:
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(REPO), "ANSIBLE_NOCOLOR": "1"}
    shown = subprocess.run([str(BIN / "ansible-doc"), "-t", "module", "vmform.libvirt.vmform"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    for expected in ("vmform.libvirt.vmform", "project_src", "lock_timeout", "EXAMPLES:", "RETURN VALUES:",
                     "check_mode", "diff_mode", "outputs"):
        assert expected in shown.stdout, expected
    assert "ERROR" not in shown.stderr


GET_PIP_STAND_IN = '''\
# Written by tests/integration/test_ansible.py. ansible-test bootstraps pip in each sanity virtualenv with a
# get-pip.py it downloads from a host this machine cannot reach; this installs the same pip from the package
# index instead, with the pip of the interpreter that runs the tests (pip --python).
import subprocess, sys
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(subprocess.call([{python!r}, "-m", "pip", "--python", sys.executable, "install", *args]))
'''


def test_ansible_test_sanity_passes_for_the_collection() -> None:
    """The real ``ansible-test sanity`` (validate-modules, pylint, pep8, import, compile, yamllint, ansible-doc,
    ...) on ansible_collections/vmform/libvirt. It installs each test's requirements into its own virtualenvs,
    kept under .venv/ansible-test-home so later runs take seconds."""
    import ansible_test

    source = (Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py").read_text()
    found = re.search(r"pip='([\d.]+)'", source)
    assert found, "cannot tell which pip ansible-test bootstraps"
    home = REPO / ".venv" / "ansible-test-home"
    cache = home / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"get_pip_{found.group(1).replace('.', '_')}.py").write_text(GET_PIP_STAND_IN.format(python=sys.executable))
    env = {
        **os.environ,
        "HOME": str(home),
        # pip's own configuration (index, mirrors) stays the user's
        "XDG_CONFIG_HOME": os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    completed = subprocess.run(
        [str(BIN / "ansible-test"), "sanity", "--python", f"{sys.version_info.major}.{sys.version_info.minor}"],
        cwd=REPO / "ansible_collections" / "vmform" / "libvirt", capture_output=True, text=True, env=env,
        stdin=subprocess.DEVNULL, timeout=600,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-6000:]
    for test in ("validate-modules", "pylint", "pep8", "import", "compile", "yamllint", "ansible-doc"):
        assert f'Running sanity test "{test}"' in output, test


class _FakeModule:
    """What run() reads of an AnsibleModule."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.check_mode = False
        self._diff = False


@pytest.mark.parametrize("show", [False, True])
def test_sensitive_outputs_are_masked_unless_asked(tmp_path: Path, show: bool) -> None:
    """The module masks through the same library call as `vmform output` (api.project_outputs): `-v` never prints
    a secret unless show_sensitive asks for it."""
    name = f"vmftest-{secrets.token_hex(3)}"  # only read: an empty project's plan creates nothing
    (tmp_path / "vmform.toml").write_text(f'[project]\nname = "{name}"\nuri = "{URI}"\n')
    (tmp_path / "main.yaml").write_text(
        "variables:\n  token: {type: string, default: s3cr3t, sensitive: true}\n"
        "outputs:\n  token: {value: \"{{ var.token }}\", sensitive: true}\n  plain: {value: hello}\n")
    params = dict(project_src=str(tmp_path), state="present", targets=[], variables={}, parallelism=None, uri=None,
                  lock_timeout=0.0, restart=False, show_sensitive=show)
    result = _ansible_module().run(_FakeModule(params))
    assert result["project_outputs"] == {"token": "s3cr3t" if show else "(sensitive)", "plain": "hello"}
    assert show or "s3cr3t" not in repr(result)


def _ansible_module() -> Any:
    import importlib.util

    path = REPO / "ansible_collections/vmform/libvirt/plugins/modules/vmform.py"
    spec = importlib.util.spec_from_file_location("vmform_ansible_module", path)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded
