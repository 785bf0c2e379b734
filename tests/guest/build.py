"""A tiny guest for end-to-end tests, built from Debian packages at test time and cached.

The kernel comes from Debian's linux-image-cloud-amd64; the initramfs is busybox-static plus the few
kernel modules a virtio/sata guest needs and an /init the test writes. It boots under TCG and prints
to its serial console within seconds. The cache lives in a directory the test suite owns
(VMFORM_TEST_CACHE, default /var/cache/vmform-test/guest); QEMU reads the files, so it is not in a
private temporary directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("VMFORM_TEST_CACHE", "/var/cache/vmform-test/guest"))
KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# What a guest with virtio NICs and disks, a sata/ide cdrom (the cloud-init seed) and ACPI needs.
MODULES = ["virtio_pci", "virtio_net", "virtio_blk", "virtio_balloon", "virtio_console", "ata_piix", "ahci",
           "sr_mod", "sd_mod", "isofs", "button", "evdev"]


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initrd: Path


def _download(package: str, into: Path) -> Path:
    for attempt in range(2):
        result = subprocess.run(["apt-get", "download", package], cwd=into, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            break
        if attempt == 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
    else:
        raise RuntimeError(f"apt-get download {package} failed: {result.stderr.strip()}")
    return next(into.glob(f"{package.replace('-', '?')}_*.deb"))


def _real_kernel_package(into: Path) -> str:
    """linux-image-cloud-amd64 is a metapackage: the kernel is in the versioned package it depends on."""
    deb = _download(KERNEL_PACKAGE, into)
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"(linux-image-[0-9][^\s,(]*-cloud-amd64)", depends)
    if not match:
        raise RuntimeError(f"cannot find the kernel package in '{depends.strip()}'")
    return match.group(1)


def _module_depends(path: Path) -> list[str]:
    match = re.search(rb"\x00depends=([^\x00]*)\x00", path.read_bytes())
    return [name for name in (match.group(1).decode().split(",") if match else []) if name]


def _module_order(root: Path, wanted: list[str]) -> list[Path]:
    """Modules to insmod, dependencies first."""
    index = {p.stem.replace("-", "_"): p for p in root.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen or key not in index:
            return
        seen.add(key)
        for dependency in _module_depends(index[key]):
            visit(dependency)
        order.append(index[key])

    for name in wanted:
        visit(name)
    return order


def _kernel_tree() -> Path:
    tree = CACHE / "kernel-tree"
    if (tree / ".done").exists():
        return tree
    with tempfile.TemporaryDirectory() as scratch:
        scratch_path = Path(scratch)
        package = _real_kernel_package(scratch_path)
        deb = _download(package, scratch_path)
        if tree.exists():
            shutil.rmtree(tree)
        tree.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        busybox = _download(BUSYBOX_PACKAGE, scratch_path)
        subprocess.run(["dpkg-deb", "-x", str(busybox), str(tree / "busybox")], check=True)
    (tree / ".done").write_text("ok")
    return tree


def build_guest(init_script: str) -> Guest:
    """The kernel and an initramfs running ``init_script`` as /init (a busybox sh script)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    os.chmod(CACHE, 0o755)
    # Test runs in several checkouts share the cache: one builds at a time.
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(init_script)


def _build(init_script: str) -> Guest:
    tree = _kernel_tree()
    kernel = CACHE / "vmlinuz"
    if not kernel.exists():
        shutil.copyfile(next((tree / "boot").glob("vmlinuz-*")), kernel)
        os.chmod(kernel, 0o644)
    digest = hashlib.sha256(init_script.encode()).hexdigest()[:16]
    initrd = CACHE / f"initrd-{digest}.gz"
    if initrd.exists():
        return Guest(kernel, initrd)
    busybox = tree / "busybox" / "bin" / "busybox"
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "root"
        for directory in ("bin", "sbin", "proc", "sys", "dev", "mnt", "modules", "tmp", "etc"):
            (root / directory).mkdir(parents=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        names = []
        for module in _module_order(tree / "lib" / "modules", MODULES):
            shutil.copy2(module, root / "modules" / module.name)
            names.append(module.name)
        (root / "modules" / "order").write_text("\n".join(names) + "\n")
        init = root / "init"
        init.write_text(init_script)
        init.chmod(0o755)
        files = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, capture_output=True, check=True).stdout
        archive = subprocess.run([str(busybox), "cpio", "-o", "-H", "newc"], cwd=root, input=files,
                                 capture_output=True, check=True).stdout
        partial = initrd.with_suffix(".partial")
        partial.write_bytes(subprocess.run(["gzip", "-9"], input=archive, capture_output=True, check=True).stdout)
        os.chmod(partial, 0o644)
        partial.rename(initrd)
    return Guest(kernel, initrd)


# The /init prologue every test guest shares: busybox applets, the pseudo file systems, the modules.
INIT_PROLOGUE = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for module in $(cat /modules/order); do insmod /modules/$module 2>/dev/null; done
# ACPI power button -> clean power off, so vmform's graceful shutdown works on this guest too.
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\\npoweroff -f\\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
acpid -d >/dev/null 2>&1 &
"""
