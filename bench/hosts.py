#!/usr/bin/env python3
"""A no-op plan over two hosts against one host, in the same run (docs/PERFORMANCE.md, "Several hosts").

    .venv/bin/python bench/hosts.py [--domains 250] [--repeat 3]

Starts two fake libvirt hosts (independent system daemons in their own mount namespaces, as the tests do:
tests/integration/remote_hosts.py), applies a project of N defined (stopped) domains on host b, then one of N
on b and N on c, and times `vmform plan` with nothing to change for each: the hosts are read concurrently, so
two hosts should cost little more than one (issue 13 asks for a ratio at or under 1.3). A bare libvirt-python
loop reading the same N domains' XML on one host is timed alongside, for scale. Everything is removed at the
end (the fake hosts with it).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.remote_hosts import FakeHosts  # noqa: E402

VMFORM = ROOT / ".venv" / "bin" / "vmform"


def project(directory: Path, name: str, hosts: dict[str, str], domains: dict[str, int]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    table = "".join(f'[hosts.{host}]\nuri = "{uri}"\n' for host, uri in hosts.items())
    (directory / "vmform.toml").write_text(
        f'[project]\nname = "{name}"\nmanifests = ["*.yaml"]\nparallelism = 8\n\n{table}')
    lines = ["domains:"]
    for host, count in domains.items():
        lines += [f"  vm_{host}:", f"    count: {count}", f'    name: "{name}-{host}-{{{{ index }}}}"', f"    host: {host}",
                  "    type: qemu", "    memory: 32MiB", "    state: stopped"]
    (directory / "main.yaml").write_text("\n".join(lines) + "\n")
    return directory


def vmform(directory: Path, *args: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([str(VMFORM), "-C", str(directory), *args], capture_output=True, text=True)
    took = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"vmform {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    if args[0] == "plan" and "No changes." not in result.stdout:
        raise SystemExit(f"expected no changes:\n{result.stdout[-2000:]}")
    return took


def bare_read(uri: str, prefix: str) -> float:
    import libvirt

    started = time.perf_counter()
    conn = libvirt.open(uri)
    for dom in conn.listAllDomains():
        if dom.name().startswith(prefix):
            dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            dom.state()
            dom.autostart()
    conn.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=250)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    n = options.domains
    farm = FakeHosts()
    work = Path(tempfile.mkdtemp(prefix="vmform-bench-hosts-"))
    one = two = None
    try:
        b, c = farm.host("b"), farm.host("c")
        name = farm.session
        one = project(work / "one", f"{name}-one", {"b": b.uri}, {"b": n})
        two = project(work / "two", f"{name}-two", {"b": b.uri, "c": c.uri}, {"b": n, "c": n})
        print(f"applying {n} domains on b, then {n} on b and {n} on c ...", flush=True)
        vmform(one, "apply", "--auto-approve")
        vmform(two, "apply", "--auto-approve")
        times: dict[str, list[float]] = {"bare loop, 1 host": [], "plan, 1 host": [], "plan, 2 hosts": []}
        for _ in range(options.repeat):
            times["bare loop, 1 host"].append(bare_read(b.uri, f"{name}-one-"))
            times["plan, 1 host"].append(vmform(one, "plan"))
            times["plan, 2 hosts"].append(vmform(two, "plan"))
        medians = {label: statistics.median(values) for label, values in times.items()}
        print(f"\nno-op plan, {n} defined domains per host, median of {options.repeat}:")
        for label, value in medians.items():
            print(f"  {label:<20} {value:7.2f} s")
        print(f"  2 hosts / 1 host     {medians['plan, 2 hosts'] / medians['plan, 1 host']:7.2f}")
        print(f"  1 host / bare loop   {medians['plan, 1 host'] / medians['bare loop, 1 host']:7.2f}")
    finally:
        for directory in (two, one):
            if directory is not None:
                subprocess.run([str(VMFORM), "-C", str(directory), "destroy", "--auto-approve"], capture_output=True)
        farm.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
