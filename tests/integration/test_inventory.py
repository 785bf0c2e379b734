"""vmform inventory: the project's domains as an Ansible inventory that ansible-inventory reads, as a file
(YAML, INI) and as a dynamic inventory script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ANSIBLE_INVENTORY = Path(sys.executable).parent / "ansible-inventory"


@pytest.mark.skipif(not ANSIBLE_INVENTORY.exists(), reason="ansible-core is a test dependency")
def test_inventory_is_read_by_ansible(project: Any, tmp_path: Path) -> None:
    p = project.prefix
    project.write(f"""
networks:
  lan: {{name: {p}-lan, mode: isolated, bridge: {project.bridge_prefix}i, ipv4: {project.subnet}.1/24}}
domains:
  web:
    name: {p}-web
    type: qemu
    memory: 32MiB
    state: stopped
    groups: [webservers, lab]
    interfaces: [{{network: lan, ip: {project.subnet}.20, hostname: web}}]
  db:
    name: {p}-db
    type: qemu
    memory: 32MiB
    state: stopped
    groups: [lab]
""")
    project.apply()
    env = {**os.environ, "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False", "ANSIBLE_LOCALHOST_WARNING": "False"}

    def ansible_list(source: Path) -> dict[str, Any]:
        done = subprocess.run([str(ANSIBLE_INVENTORY), "-i", str(source), "--list"], capture_output=True, text=True,
                              env=env, timeout=120, check=True)
        return dict(json.loads(done.stdout))

    yaml_file = tmp_path / "inventory.yml"
    yaml_file.write_text(project.run("inventory", check=True).stdout)
    ini_file = tmp_path / "inventory.ini"
    ini_file.write_text(project.run("inventory", "--ini", check=True).stdout)
    script = tmp_path / "vmform-inventory"
    script.write_text(f"#!/bin/sh\nexec {shutil.which('env')} NO_COLOR=1 {sys.executable} -m vmform -C {project.root} "
                      "inventory \"$@\"\n")
    script.chmod(0o755)
    for source in (yaml_file, ini_file, script):
        listed = ansible_list(source)
        assert sorted(listed["webservers"]["hosts"]) == [f"{p}-web"], (source, listed)
        assert sorted(listed["lab"]["hosts"]) == [f"{p}-db", f"{p}-web"], (source, listed)
        web = listed["_meta"]["hostvars"][f"{p}-web"]
        assert web["ansible_host"] == f"{project.subnet}.20"  # the reservation, before any lease
        assert web["vmform_address"] == "domain.web" and web["vmform_state"] == "stopped"
