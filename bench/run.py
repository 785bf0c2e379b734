#!/usr/bin/env python3
"""vmform against a bare libvirt-python loop doing the same work (docs/PERFORMANCE.md).

    .venv/bin/python bench/run.py [--sizes 20,100] [--repeat 3] [--quick] [--uri qemu:///system]

For each size N, and each of --repeat rounds:
  - bare loop, sequential and with a thread pool (8 threads over 2 connections): create an isolated
    network, a dir pool, N qcow2 volumes and N domains (started when N is the running size), read
    every object's XML back, tear everything down;
  - vmform, as a subprocess (.venv/bin/vmform -C PROJECT ..., so CLI start-up counts): apply, plan with
    no changes, plan after one domain changed in the manifests, destroy.
It prints each phase's median wall time, the ratio vmform / threaded bare loop and the peak RSS of the
vmform process. Every object is named vmfbench-<id>-...; all of them (and vmform's ledger and lock
secrets) are removed at the end, on an error, and on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import libvirt

ROOT = Path(__file__).resolve().parent.parent
VMFORM = ROOT / ".venv" / "bin" / "vmform"
POOL_ROOT = Path(os.environ.get("VMFORM_BENCH_POOL_ROOT", "/var/lib/vmform-bench"))
WORK_ROOT = Path(os.environ.get("VMFORM_BENCH_WORK", "/tmp/vmform-bench"))
PREFIX = "vmfbench-"
THREADS = 8
CONNECTIONS = 2  # 8 threads over 2 connections: at most 4 calls in flight per connection (libvirtd allows 5)
MEMORY_KIB = 65536
VOLUME_BYTES = 64 * 1024 * 1024

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


# --- names and XML (the shapes `vmform render` produces for the benchmark project) -------------------


class Names:
    def __init__(self, run_id: str, size: int, index: int) -> None:
        self.prefix = f"{PREFIX}{run_id}-{size}"
        self.network = f"{self.prefix}-net"
        self.pool = f"{self.prefix}-pool"
        self.bridge = f"vmfb{run_id[:4]}{index}"  # at most 15 characters
        self.subnet = f"10.{250 + index % 6}.{int(run_id[:2], 16)}"
        self.pool_dir = POOL_ROOT / self.prefix

    def domain(self, i: int) -> str:
        return f"{self.prefix}-vm{i:03d}"

    def volume(self, i: int) -> str:
        return f"{self.prefix}-vm{i:03d}"


def network_xml(n: Names) -> str:
    return (f"<network><name>{n.network}</name><bridge name='{n.bridge}'/>"
            f"<ip address='{n.subnet}.1' prefix='24'/></network>")


def pool_xml(n: Names) -> str:
    return f"<pool type='dir'><name>{n.pool}</name><target><path>{n.pool_dir}</path></target></pool>"


def volume_xml(n: Names, i: int) -> str:
    return (f"<volume><name>{n.volume(i)}</name><capacity unit='bytes'>{VOLUME_BYTES}</capacity>"
            "<allocation unit='bytes'>0</allocation><target><format type='qcow2'/>"
            "<permissions><mode>0600</mode></permissions></target></volume>")


def domain_xml(n: Names, i: int) -> str:
    return f"""<domain type='qemu'><name>{n.domain(i)}</name>
  <os><type>hvm</type><boot dev='hd'/></os><features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>
      <source pool='{n.pool}' volume='{n.volume(i)}'/><target dev='vda' bus='virtio'/></disk>
    <interface type='network'><source network='{n.network}'/><model type='virtio'/></interface>
    <serial type='pty'><target port='0'/></serial><console type='pty'><target type='serial' port='0'/></console>
  </devices>
  <vcpu>1</vcpu><memory unit='KiB'>{MEMORY_KIB}</memory><currentMemory unit='KiB'>{MEMORY_KIB}</currentMemory>
</domain>"""


def manifest(n: Names, size: int, running: bool, changed: bool = False) -> str:
    lines = [
        "networks:",
        f"  {n.network}: {{mode: isolated, bridge: {n.bridge}, ipv4: {n.subnet}.1/24}}",
        "pools:",
        f"  {n.pool}: {{type: dir, path: {n.pool_dir}}}",
        "volumes:",
    ]
    lines += [f"  {n.volume(i)}: {{pool: {n.pool}, format: qcow2, size: 64MiB}}" for i in range(size)]
    lines.append("domains:")
    state = "running" if running else "stopped"
    for i in range(size):
        description = "changed" if changed and i == 0 else ""
        lines += [
            f"  {n.domain(i)}:",
            "    type: qemu",
            "    vcpus: 1",
            "    memory: 64MiB",
            f"    description: '{description}'",
            f"    disks: [{{volume: {n.volume(i)}}}]",
            f"    interfaces: [{{network: {n.network}}}]",
            f"    state: {state}",
        ]
    return "\n".join(lines) + "\n"


# --- the bare loop ---------------------------------------------------------------------------------


class Bare:
    """The same work as vmform, straight through libvirt-python: the limit vmform is measured against."""

    def __init__(self, uri: str, threaded: bool) -> None:
        self.threaded = threaded
        self.conns = [libvirt.open(uri) for _ in range(CONNECTIONS if threaded else 1)]
        self._local = threading.local()
        self._next = 0
        self._lock = threading.Lock()

    def conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:  # each worker thread sticks to one connection, handed out round robin
            with self._lock:
                conn = self.conns[self._next % len(self.conns)]
                self._next += 1
            self._local.conn = conn
        return conn

    def each(self, fn: Callable[[int], Any], count: int) -> None:
        if not self.threaded:
            for i in range(count):
                fn(i)
            return
        with ThreadPoolExecutor(THREADS) as pool:
            for future in [pool.submit(fn, i) for i in range(count)]:
                future.result()

    def apply(self, n: Names, size: int, running: bool) -> None:
        conn = self.conns[0]
        net = conn.networkDefineXML(network_xml(n))
        net.create()
        n.pool_dir.mkdir(parents=True, exist_ok=True)
        pool = conn.storagePoolDefineXML(pool_xml(n), 0)
        pool.create(0)
        # libvirt refuses concurrent jobs on one pool: volumes are created one after another, as vmform does.
        for i in range(size):
            pool.createXML(volume_xml(n, i), 0)

        def define(i: int) -> None:
            dom = self.conn().defineXML(domain_xml(n, i))
            if running:
                dom.create()

        self.each(define, size)

    def read(self, n: Names) -> None:
        """Every object's XML once (twice for running domains), as a plan needs at the least. Objects
        that other clients of the daemon delete meanwhile are skipped, as vmform skips them."""
        conn = self.conns[0]
        for dom in conn.listAllDomains():
            try:
                dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                if dom.isActive():
                    dom.XMLDesc(0)
            except libvirt.libvirtError:
                pass
        for net in conn.listAllNetworks():
            try:
                net.XMLDesc(0)
            except libvirt.libvirtError:
                pass
        for pool in conn.listAllStoragePools():
            try:
                pool.XMLDesc(0)
            except libvirt.libvirtError:
                continue
            if pool.name() == n.pool:
                for vol in pool.listAllVolumes():
                    vol.XMLDesc(0)

    def destroy(self, n: Names, size: int) -> None:
        def remove(i: int) -> None:
            dom = self.conn().lookupByName(n.domain(i))
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)

        self.each(remove, size)
        conn = self.conns[0]
        pool = conn.storagePoolLookupByName(n.pool)
        for vol in pool.listAllVolumes():
            vol.delete(0)
        pool.destroy()
        pool.undefine()
        net = conn.networkLookupByName(n.network)
        net.destroy()
        net.undefine()

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


# --- vmform as a subprocess ------------------------------------------------------------------------


def run_vmform(project: Path, *args: str, expect: int = 0) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one vmform command, which must exit with ``expect``."""
    env = {**os.environ, "NO_COLOR": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen([str(VMFORM), "-C", str(project), "-q", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    out, err = proc.communicate()
    took = time.perf_counter() - started
    rss = _last_child_rss.pop(proc.pid, 0.0)  # recorded when Popen reaped it (_wait4_popen)
    if proc.returncode != expect:
        raise RuntimeError(f"vmform {' '.join(args)} exited {proc.returncode}\n{out.decode()}\n{err.decode()}")
    return took, rss


_last_child_rss: dict[int, float] = {}


def _wait4_popen() -> None:
    """Make Popen reap children with os.wait4, recording each child's own peak RSS (ru_maxrss, KiB)."""
    original = subprocess.Popen._try_wait  # type: ignore[attr-defined]

    def try_wait(self: subprocess.Popen[bytes], wait_flags: int) -> tuple[int, int]:
        try:
            pid, status, usage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            return original(self, wait_flags)
        if pid:
            _last_child_rss[pid] = usage.ru_maxrss / 1024
        return pid, status

    subprocess.Popen._try_wait = try_wait  # type: ignore[attr-defined]


_wait4_popen()


# --- cleanup ---------------------------------------------------------------------------------------


def cleanup(uri: str, prefix: str) -> None:
    """Remove every libvirt object (and vmform secret) whose name starts with ``prefix``."""
    conn = libvirt.open(uri)
    try:
        doms = [d for d in conn.listAllDomains() if d.name().startswith(prefix)]

        def remove(dom: Any) -> None:
            try:
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
            except libvirt.libvirtError:
                pass

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(remove, doms))
        for spool in conn.listAllStoragePools():
            if not spool.name().startswith(prefix):
                continue
            try:
                if spool.isActive():
                    for vol in spool.listAllVolumes():
                        vol.delete(0)
                    spool.destroy()
                spool.undefine()
            except libvirt.libvirtError:
                pass
        for net in conn.listAllNetworks():
            if net.name().startswith(prefix):
                try:
                    if net.isActive():
                        net.destroy()
                    net.undefine()
                except libvirt.libvirtError:
                    pass
        for secret in conn.listAllSecrets():
            if (secret.usageID() or "").startswith(f"vmform/{prefix}"):
                try:
                    secret.undefine()
                except libvirt.libvirtError:
                    pass
    finally:
        conn.close()
    for path in POOL_ROOT.glob(f"{prefix}*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in WORK_ROOT.glob(f"{prefix}*"):
        shutil.rmtree(path, ignore_errors=True)


# --- the run ---------------------------------------------------------------------------------------


def timed(fn: Callable[..., Any], *args: Any) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def bench_size(uri: str, run_id: str, size: int, index: int, running: bool, repeat: int,
               bare_seq: bool) -> dict[str, dict[str, list[float]]]:
    """phase -> {"seq": [...], "thr": [...], "vmform": [...], "rss": [...]}"""
    results: dict[str, dict[str, list[float]]] = {}

    def record(phase: str, column: str, value: float) -> None:
        results.setdefault(phase, {}).setdefault(column, []).append(value)

    for round_number in range(repeat):
        n = Names(run_id, size, index)
        variants = [("seq", False), ("thr", True)] if bare_seq else [("thr", True)]
        for column, threaded in variants:
            bare = Bare(uri, threaded)
            try:
                record("apply", column, timed(bare.apply, n, size, running))
                record("plan (no changes)", column, timed(bare.read, n))
                record("plan (one changed)", column, results["plan (no changes)"][column][-1])
                record("destroy", column, timed(bare.destroy, n, size))
            finally:
                bare.close()
                cleanup(uri, n.prefix)
            print(f"  N={size} round {round_number + 1}: bare {column} done", file=sys.stderr, flush=True)
        project = WORK_ROOT / n.prefix
        project.mkdir(parents=True, exist_ok=True)
        n.pool_dir.mkdir(parents=True, exist_ok=True)
        (project / "vmform.toml").write_text(
            f'[project]\nname = "{n.prefix}"\nuri = "{uri}"\nmanifests = ["*.yaml"]\nparallelism = {THREADS}\n'
            "shutdown_timeout = 5\n")
        (project / "main.yaml").write_text(manifest(n, size, running))
        try:
            # --detailed-exitcode: 0 proves the plan found nothing to do, 2 that it found the change.
            for phase, args, change, expect in [
                ("apply", ("apply", "--auto-approve"), False, 0),
                ("plan (no changes)", ("plan", "--detailed-exitcode"), False, 0),
                ("plan (one changed)", ("plan", "--detailed-exitcode"), True, 2),
                ("destroy", ("destroy", "--auto-approve"), False, 0),
            ]:
                (project / "main.yaml").write_text(manifest(n, size, running, changed=change))
                took, rss = run_vmform(project, *args, expect=expect)
                record(phase, "vmform", took)
                record(phase, "rss", rss)
        finally:
            cleanup(uri, n.prefix)
        print(f"  N={size} round {round_number + 1}: vmform done", file=sys.stderr, flush=True)
    return results


# Every module `vmform plan` loads on its way (the CLI imports the rest lazily, per command).
PLAN_IMPORTS = "import vmform.cli, vmform.api, vmform.planview, vmform.render.xml, networkx, libvirt, rich.console"


def start_up(command: list[str]) -> tuple[float, float]:
    """Wall time of a short command (process start-up and imports), median of 5, and its peak RSS."""
    times = []
    rss = 0.0
    for _ in range(5):
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc.wait()
        times.append(time.perf_counter() - started)
        rss = max(rss, _last_child_rss.pop(proc.pid, 0.0))
    return statistics.median(times), rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", type=int, default=20, help="size of the started case (default 20)")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated sizes; the --domains size is started, the others defined only "
                             "(default: DOMAINS,100; add 500 for the large plan case)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per size; medians are reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="one round, the started size only")
    parser.add_argument("--no-seq-large", action="store_true",
                        help="skip the sequential bare loop for the defined-only sizes")
    parser.add_argument("--no-seq", action="store_true", help="skip the sequential bare loop entirely")
    parser.add_argument("--uri", default=os.environ.get("VMFORM_BENCH_URI", "qemu:///system"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [args.domains, 100]
    if args.quick:
        sizes, args.repeat = [args.domains], 1
    run_id = secrets.token_hex(3)
    prefix = f"{PREFIX}{run_id}"

    def on_signal(signum: int, _frame: Any) -> None:
        print(f"\ninterrupted (signal {signum}): cleaning up {prefix}-*", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup(args.uri, prefix)
        os._exit(130)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    rows: list[tuple[str, float | None, float | None, float, float | None, float]] = []
    try:
        took, rss = start_up([str(VMFORM), "--version"])
        rows.append(("CLI start-up: vmform --version", None, None, took, None, rss))
        took, rss = start_up([str(ROOT / ".venv" / "bin" / "python"), "-c", PLAN_IMPORTS])
        rows.append(("CLI start-up: every module plan imports", None, None, took, None, rss))
        for index, size in enumerate(sizes):
            running = size == args.domains
            results = bench_size(args.uri, run_id, size, index, running, args.repeat,
                                 bare_seq=not args.no_seq and (running or not args.no_seq_large))
            label = f"N={size} {'started' if running else 'defined only'}"
            for phase, columns in results.items():
                med = {k: statistics.median(v) for k, v in columns.items()}
                rss = max(columns.get("rss", [0.0]))
                rows.append((f"{label}: {phase}", med.get("seq"), med.get("thr"), med["vmform"],
                             med["vmform"] / med["thr"] if med.get("thr") else None, rss))
    finally:
        cleanup(args.uri, prefix)

    def fmt(value: float | None, unit: str = "s") -> str:
        return "—" if value is None else (f"{value:.2f} {unit}" if unit else f"{value:.2f}")

    print(f"\nvmform benchmark: {len(sizes)} sizes {sizes}, median of {args.repeat}, uri {args.uri}\n")
    print("| phase | bare seq | bare threaded | vmform | vmform / threaded | vmform peak RSS |")
    print("|---|---|---|---|---|---|")
    for phase, seq, thr, vmf, ratio, rss in rows:
        ratio_text = "—" if ratio is None else f"{ratio:.2f}×"
        print(f"| {phase} | {fmt(seq)} | {fmt(thr)} | {fmt(vmf)} | {ratio_text} | {rss:.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
