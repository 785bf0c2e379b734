"""End to end: two real (tiny, TCG) guests booted by vmform with direct kernel boot, each reading its own
cloud-init seed from a cdrom and pinging the other over an isolated vmform network.

The guest is built at test time from Debian packages (tests/guest/build.py) and cached. The assertions are
on the guests' serial console logs (console_log), read through `vmform console`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.guest.build import INIT_PROLOGUE, build_guest

BOOT_TIMEOUT = 150.0

# Busybox /init: mount the seed cdrom, print its hostname, take the address the kernel command line names,
# ping the peer (it may boot later: retry, bounded), take a DHCP lease, then watch the seed's instance-id.
GUEST_INIT = INIT_PROLOGUE + r"""
echo "vmf: booted"
mkdir -p /seed
n=0
while [ ! -b /dev/sr0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
if mount -t iso9660 -o ro /dev/sr0 /seed; then
    echo "hostname from seed: $(sed -n 's/^local-hostname: *//p' /seed/meta-data)"
    echo "user-data from seed: $(head -n 1 /seed/user-data) $(grep -o 'vmf-marker-[a-z0-9]*' /seed/user-data | head -n 1)"
else
    echo "vmf: cannot mount the seed"
fi
for word in $(cat /proc/cmdline); do
    case "$word" in
        vmf.ip=*) address="${word#vmf.ip=}" ;;
        vmf.peer=*) peer="${word#vmf.peer=}" ;;
    esac
done
ip link set lo up
ip link set eth0 up
ip addr add "$address" dev eth0
echo "address: $address"
result=failed
n=0
while [ $n -lt 90 ]; do
    if ping -c 1 -W 1 "$peer" >/dev/null 2>&1; then result=ok; break; fi
    n=$((n+1))
done
echo "ping $peer: $result"
# Ask the network's DHCP server too (the script does nothing with the answer): the lease is what
# `vmform output` and `apply --wait-ip` read.
if udhcpc -i eth0 -n -q -t 10 -T 2 -s /bin/true >/dev/null 2>&1; then echo "dhcp: lease ok"; else echo "dhcp: no lease"; fi
echo "vmf: done"
# Then watch the seed: a new medium in the drive (vmform swaps it live when the seed is replaced) shows as a
# new instance-id. Mounted only for a moment each time, so the tray is not held locked.
umount /seed 2>/dev/null
last=""
while :; do
    if mount -t iso9660 -o ro /dev/sr0 /seed 2>/dev/null; then
        iid="$(sed -n 's/^instance-id: *//p' /seed/meta-data)"
        umount /seed
        if [ -n "$iid" ] && [ "$iid" != "$last" ]; then echo "instance-id from seed: $iid"; last="$iid"; fi
    fi
    sleep 2
done
"""


def _wait_for_lines(paths: dict[str, Path], wanted: dict[str, list[str]], timeout: float,
                    stop_at: str | None = None) -> dict[str, str]:
    """Poll the console logs until each holds its wanted lines (or the time is up); returns the logs."""
    deadline = time.monotonic() + timeout
    logs: dict[str, str] = {}
    while True:
        for name, path in paths.items():
            logs[name] = path.read_text(errors="replace") if path.exists() else ""
        done = all(line in logs[name] for name, lines in wanted.items() for line in lines)
        finished = stop_at is not None and all(stop_at in log for log in logs.values())  # no point waiting on
        if done or finished or time.monotonic() >= deadline:
            return logs
        time.sleep(1)


class LiveConsole:
    """`vmform console --live ADDRESS` running in the background, its output collected."""

    def __init__(self, project: Any, address: str) -> None:
        env = {**os.environ, "NO_COLOR": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "vmform", "-C", str(project.root), "console", "--live",
                                         address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL)
        self.output = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for chunk in iter(lambda: self.process.stdout.read1(4096), b""):  # type: ignore[union-attr]
            self.output += chunk

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.output and time.monotonic() < deadline and self.process.poll() is None:
            time.sleep(0.2)
        return self.output.decode(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def test_two_guests_read_their_seeds_and_ping_each_other(project: Any, conn: Any) -> None:
    started = time.monotonic()
    guest = build_guest(GUEST_INIT)
    p, subnet = project.prefix, project.subnet
    names = {"a": f"{p}-alpha", "b": f"{p}-beta"}
    ips = {"a": f"{subnet}.11", "b": f"{subnet}.12"}
    peer = {"a": "b", "b": "a"}
    hexid = p.split("-")[1]
    macs = {"a": f"52:54:00:{hexid[0:2]}:{hexid[2:4]}:11", "b": f"52:54:00:{hexid[0:2]}:{hexid[2:4]}:12"}
    domains = ""
    for key in ("a", "b"):
        domains += f"""
      {names[key]}:
        type: qemu
        memory: 192MiB
        allow: [host_paths]  # the test kernel and initrd live in a cache directory, outside the pool
        kernel: {guest.kernel}
        initrd: {guest.initrd}
        cmdline: "console=ttyS0 quiet vmf.ip={ips[key]}/24 vmf.peer={ips[peer[key]]}"
        console_log: true
        cloudinit: seed-{key}
        interfaces: [{{network: lan, mac: "{macs[key]}"}}]
    """
    project.write(f"""
    networks:
      lan:
        name: {p}-lan
        mode: isolated
        bridge: BRP0
        ipv4: {subnet}.1/24
        dhcp_hosts:
          - {{mac: "{macs['a']}", ip: {ips['a']}}}
          - {{mac: "{macs['b']}", ip: {ips['b']}}}
    pools:
      images: {{name: {p}-images, path: {project.pool_dir}}}
    cloudinit:
      seed-a:
        pool: images
        meta_data: {{local-hostname: {names['a']}}}
        user_data: {{write_files: [{{path: /etc/hello, content: vmf-marker-a}}]}}
      seed-b:
        pool: images
        meta_data: {{local-hostname: {names['b']}}}
        user_data: {{file: seeds/user-data-b}}
    domains:{domains}""")
    (project.root / "seeds").mkdir()
    (project.root / "seeds" / "user-data-b").write_text("#cloud-config\nruncmd: [echo vmf-marker-b]\n")
    log_paths = {key: Path(f"/var/log/libvirt/qemu/{names[key]}-console.log") for key in names}
    try:
        for path in log_paths.values():
            path.unlink(missing_ok=True)  # append='on': a leftover from another run must not answer for this one

        # user-data is sensitive: digest and size only, in the plan, its JSON and `show`.
        plan_text = project.run("plan", check=True).stdout
        assert "vmf-marker" not in plan_text and "(sensitive, sha256:" in plan_text
        assert "vmf-marker" not in project.run("plan", "--json", check=True).stdout
        assert "vmf-marker" not in project.run("show", "cloudinit.seed-b", check=True).stdout
        assert "runcmd: [echo vmf-marker-b]" in project.run("show", "--sensitive", "cloudinit.seed-b", check=True).stdout

        project.apply()
        replan = project.run("plan", check=True).stdout
        assert "No changes." in replan, replan

        wanted = {key: [f"hostname from seed: {names[key]}", f"ping {ips[peer[key]]}: ok", "dhcp: lease ok"]
                  for key in names}
        logs = _wait_for_lines(log_paths, wanted, BOOT_TIMEOUT, stop_at="vmf: done")
        shown = "\n".join(f"--- console of {names[k]} ---\n{logs[k][-3000:]}" for k in names)
        for key in names:
            assert "vmf: booted" in logs[key], shown
            for line in wanted[key]:
                assert line in logs[key], f"{names[key]}: missing '{line}'\n{shown}"
            assert f"user-data from seed: #cloud-config vmf-marker-{key}" in logs[key], shown
        asserted = [line for key in names for line in logs[key].splitlines()
                    if line.startswith(("hostname from seed:", "ping ", "user-data from seed:", "dhcp:"))]
        print("\n".join(["serial log lines asserted on:", *asserted]))

        # The same log through the CLI, and the domains' state through `vmform output`.
        console = project.run("console", f"domain.{names['a']}", check=True).stdout
        assert f"hostname from seed: {names['a']}" in console
        # Each guest asked the network's DHCP server, which reserves its address: apply --wait-ip returns,
        # and `vmform output` reports the address from the lease.
        waited = project.run("apply", "--auto-approve", "--wait-ip", "--wait-timeout", "60", check=True).stdout
        assert f"domain.{names['a']}: {ips['a']}" in waited and f"domain.{names['b']}: {ips['b']}" in waited, waited
        outputs = json.loads(project.run("output", "--json", check=True).stdout)["domains"]
        assert {o["name"]: o["state"] for o in outputs} == {names["a"]: "running", names["b"]: "running"}
        for item in outputs:
            key = "a" if item["name"] == names["a"] else "b"
            assert {"ip": ips[key], "prefix": 24, "source": "lease", "mac": macs[key]}.items() <= item["addresses"][0].items()
        table = project.run("output", check=True).stdout
        assert f"{ips['a']}/24 (lease)" in table

        # A new user-data is a new seed (new instance-id) for the guest's next boot; vmform puts it into the
        # running guest's drive live, where the guest sees the new instance-id.
        (project.root / "seeds" / "user-data-b").write_text("#cloud-config\nruncmd: [echo vmf-marker-b2]\n")
        plan = project.plan_json()
        seed_change = next(c for c in plan["changes"] if c["address"] == "cloudinit.seed-b")
        assert seed_change["action"] == "delete_then_create"
        assert "next boot" in seed_change["reason"] and "instance-id" in seed_change["reason"]
        assert "vmf-marker" not in json.dumps(plan)
        assert any(f"domain.{names['b']}" in note and "next boot" in note for note in plan["notes"])
        domain_change = next(c for c in plan["changes"] if c["address"] == f"domain.{names['b']}")
        assert [f["effect"] for f in domain_change["fields"]] == ["live"]
        new_iid = next(c for c in plan["changes"] if c["address"] == "cloudinit.seed-b")["after"]["meta_data"]["instance-id"]
        # Watch it happen through libvirt's console stream too (`console --live`, which also works remotely).
        watcher = LiveConsole(project, f"domain.{names['b']}")
        try:
            assert "Attached to" in watcher.wait_for("Attached to", 20), watcher.output
            project.apply()
            assert "No changes." in project.run("plan", check=True).stdout
            swapped = _wait_for_lines({"b": log_paths["b"]}, {"b": [f"instance-id from seed: {new_iid}"]}, 60)
            assert f"instance-id from seed: {new_iid}" in swapped["b"], swapped["b"][-2000:]
            streamed = watcher.wait_for(f"instance-id from seed: {new_iid}", 20)
            assert f"instance-id from seed: {new_iid}" in streamed, streamed
        finally:
            watcher.stop()
        print(f"after the live seed swap (serial log and console --live): instance-id from seed: {new_iid}")

        project.run("destroy", "--auto-approve", check=True)
        assert project.leftovers() == []
        assert not project.pool_dir.exists() or not any(project.pool_dir.iterdir())
    finally:
        for path in log_paths.values():
            path.unlink(missing_ok=True)
        print(f"end-to-end test took {time.monotonic() - started:.1f}s")
