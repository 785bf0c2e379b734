"""Regenerates tests/corpus/virt-install/*.xml: domains as virt-install would define them, one per option set
below, written by ``virt-install --print-xml --dry-run --virt-type qemu`` (virt-install 4.1; nothing is
defined by virt-install itself).

Each document is then made portable: the <uuid> is dropped (two test runs must never define the same UUID),
the domain name becomes NAME_PLACEHOLDER, the directory of the disk images DISKDIR_PLACEHOLDER and the
network NETWORK_PLACEHOLDER; the round-trip test creates the files under its own pool directory
(see FILES). Every document is checked on the real daemon (defined as vmftest-corpusgen-…, never started,
then undefined); an option set libvirt refuses at define time is reported and not written.

Run as root from the repository root (needs virt-install, qemu-img and libvirtd at qemu:///system):
    .venv/bin/python tests/corpus/virt-install/generate.py            # every case (MACs change each run)
    .venv/bin/python tests/corpus/virt-install/generate.py CASE ...   # only these
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import libvirt

HERE = Path(__file__).resolve().parent
GENDIR = Path("/var/lib/vmform-test/corpusgen")  # where the images exist while virt-install runs
NETWORK = "default"  # virt-install looks the network up; Debian defines 'default'
D = str(GENDIR)

# The files the documents point at; the round-trip test creates the same set in its pool directory.
FILES = {"a.qcow2": "qcow2", "c.qcow2": "qcow2", "a.raw": "raw", "b.raw": "raw", "d.raw": "raw",
         "seed.iso": "raw", "share": "dir"}

VIRT_INSTALL = ["virt-install", "--print-xml", "--dry-run", "--connect", "qemu:///system", "--virt-type", "qemu",
                "--osinfo", "detect=on,require=off", "--noautoconsole"]

NET = f"network={NETWORK}"
DISK_A = f"path={D}/a.qcow2,format=qcow2"

# name → virt-install options (besides --name). --import: one phase, the define XML is the first-boot XML.
CASES: dict[str, list[str]] = {
    # firmware and machine
    "fw-bios-pc": ["--memory", "256", "--import", "--disk", DISK_A, "--boot", "hd,menu=off", "--machine", "pc",
                   "--network", "none", "--graphics", "none"],
    "fw-bios-q35": ["--memory", "256", "--import", "--disk", DISK_A, "--boot", "hd", "--machine", "q35",
                    "--network", "none", "--graphics", "none"],
    "fw-uefi-q35": ["--memory", "512", "--import", "--disk", DISK_A, "--boot", "uefi", "--machine", "q35",
                    "--network", NET, "--graphics", "none"],
    "fw-uefi-pc": ["--memory", "512", "--import", "--disk", DISK_A, "--boot", "uefi", "--machine", "pc",
                   "--network", "none", "--graphics", "none"],
    "fw-efi-auto-secure": ["--memory", "512", "--import", "--disk", DISK_A, "--machine", "q35",
                           "--boot", "firmware=efi,firmware.feature0.name=secure-boot,firmware.feature0.enabled=yes",
                           "--network", "none", "--graphics", "none"],
    "fw-bootorder-menu": ["--memory", "256", "--import", "--disk", DISK_A, "--disk", f"path={D}/seed.iso,device=cdrom",
                          "--boot", "cdrom,hd,menu=on,bios.useserial=on", "--network", "none", "--graphics", "none"],
    "fw-direct-kernel": ["--memory", "256", "--import", "--disk", DISK_A,
                         "--boot", f"kernel={D}/a.raw,initrd={D}/b.raw,kernel_args=console=ttyS0",
                         "--network", "none", "--graphics", "none"],
    # CPU
    "cpu-host-passthrough": ["--memory", "256", "--vcpus", "2", "--cpu", "host-passthrough", "--import",
                             "--disk", DISK_A, "--network", "none", "--graphics", "none"],
    "cpu-host-model": ["--memory", "256", "--vcpus", "2", "--cpu", "host-model", "--import", "--disk", DISK_A,
                       "--network", "none", "--graphics", "none"],
    "cpu-named-features": ["--memory", "256", "--vcpus", "2", "--cpu", "Haswell-noTSX,+vmx,-hle,disable=rtm,require=ssse3",
                           "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none"],
    "cpu-named-qemu64": ["--memory", "256", "--cpu", "qemu64,match=exact", "--import", "--disk", DISK_A,
                         "--network", "none", "--graphics", "none"],
    "cpu-topology": ["--memory", "256", "--vcpus", "4,sockets=1,dies=1,cores=2,threads=2", "--import",
                     "--disk", DISK_A, "--network", "none", "--graphics", "none"],
    "cpu-current-max": ["--memory", "256", "--vcpus", "2,maxvcpus=8", "--import", "--disk", DISK_A,
                        "--network", "none", "--graphics", "none"],
    "cpu-numa-cells": ["--memory", "1024", "--vcpus", "4", "--machine", "q35",
                       "--cpu", "host-passthrough,cell0.id=0,cell0.cpus=0-1,cell0.memory=524288,"
                                "cell1.id=1,cell1.cpus=2-3,cell1.memory=524288",
                       "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none"],
    "cpu-numatune": ["--memory", "512", "--vcpus", "2", "--numatune", "0,mode=preferred", "--import", "--disk", DISK_A,
                     "--network", "none", "--graphics", "none"],
    "cpu-cputune-pin": ["--memory", "256", "--vcpus", "2", "--cputune", "vcpupin0.vcpu=0,vcpupin0.cpuset=0,"
                        "vcpupin1.vcpu=1,vcpupin1.cpuset=1", "--import", "--disk", DISK_A,
                        "--network", "none", "--graphics", "none"],
    "cpu-iothreads": ["--memory", "256", "--iothreads", "4", "--import", "--disk", f"{DISK_A},bus=virtio,driver.iothread=1",
                      "--network", "none", "--graphics", "none"],
    # memory
    "mem-balloon-max": ["--memory", "512,maxmemory=2048", "--import", "--disk", DISK_A,
                        "--network", "none", "--graphics", "none"],
    "mem-maxmemory-slots": ["--memory", "512,maxMemory=2048,maxMemory.slots=16", "--machine", "q35", "--vcpus", "2",
                            "--cpu", "qemu64,cell0.cpus=0-1,cell0.memory=524288", "--import", "--disk", DISK_A,
                            "--network", "none", "--graphics", "none"],
    "mem-current": ["--memory", "memory=1024,currentMemory=512", "--import", "--disk", DISK_A,
                    "--network", "none", "--graphics", "none"],
    "mem-hugepages": ["--memory", "1024", "--memorybacking", "hugepages=on", "--import", "--disk", DISK_A,
                      "--network", "none", "--graphics", "none"],
    "mem-backing-memfd-shared": ["--memory", "512", "--memorybacking", "source.type=memfd,access.mode=shared",
                                 "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none"],
    "mem-backing-nosharepages-locked": ["--memory", "256", "--memorybacking", "nosharepages=on,locked=on",
                                        "--memtune", "hard_limit=1048576", "--import", "--disk", DISK_A,
                                        "--network", "none", "--graphics", "none"],
    "mem-memtune-blkiotune": ["--memory", "256", "--memtune", "soft_limit=262144,swap_hard_limit=2097152",
                              "--blkiotune", "weight=500", "--import", "--disk", DISK_A,
                              "--network", "none", "--graphics", "none"],
    "mem-balloon-none": ["--memory", "256", "--memballoon", "none", "--import", "--disk", DISK_A,
                         "--network", "none", "--graphics", "none"],
    "mem-balloon-stats": ["--memory", "256", "--memballoon", "virtio,stats.period=10,autodeflate=on,freePageReporting=on",
                          "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none"],
    # disks
    "disk-virtio-none-native": ["--memory", "256", "--import",
                                "--disk", f"{DISK_A},bus=virtio,cache=none,io=native,discard=unmap",
                                "--network", "none", "--graphics", "none"],
    "disk-virtio-writeback-threads": ["--memory", "256", "--import",
                                      "--disk", f"{DISK_A},bus=virtio,cache=writeback,io=threads",
                                      "--network", "none", "--graphics", "none"],
    "disk-sata-unsafe-raw": ["--memory", "256", "--machine", "q35", "--import",
                             "--disk", f"path={D}/a.raw,format=raw,bus=sata,cache=unsafe",
                             "--network", "none", "--graphics", "none"],
    "disk-scsi-discard": ["--memory", "256", "--import", "--controller", "scsi,model=virtio-scsi",
                          "--disk", f"{DISK_A},bus=scsi,discard=unmap,detect_zeroes=unmap",
                          "--network", "none", "--graphics", "none"],
    "disk-ide-raw": ["--memory", "256", "--machine", "pc", "--import",
                     "--disk", f"path={D}/a.raw,format=raw,bus=ide,cache=writethrough",
                     "--network", "none", "--graphics", "none"],
    "disk-usb-readonly": ["--memory", "256", "--import", "--disk", DISK_A,
                          "--disk", f"path={D}/b.raw,format=raw,bus=usb,readonly=on",
                          "--network", "none", "--graphics", "none"],
    "disk-shareable-raw": ["--memory", "256", "--import", "--disk", DISK_A,
                           "--disk", f"path={D}/d.raw,format=raw,bus=virtio,shareable=on,cache=none",
                           "--network", "none", "--graphics", "none"],
    "disk-serial-bootorder": ["--memory", "256", "--import", "--disk", f"{DISK_A},serial=ABC123,boot.order=1",
                              "--disk", f"path={D}/c.qcow2,format=qcow2,boot.order=2",
                              "--network", "none", "--graphics", "none"],
    "disk-iotune": ["--memory", "256", "--import",
                    "--disk", f"{DISK_A},total_bytes_sec=10485760,total_iops_sec=500",
                    "--network", "none", "--graphics", "none"],
    "disk-multi-bus": ["--memory", "256", "--machine", "q35", "--import", "--disk", f"{DISK_A},bus=virtio",
                       "--disk", f"path={D}/a.raw,format=raw,bus=sata",
                       "--disk", f"path={D}/c.qcow2,format=qcow2,bus=scsi",
                       "--network", "none", "--graphics", "none"],
    "disk-blockio-sizes": ["--memory", "256", "--import", "--disk", f"{DISK_A},blockio.logical_block_size=4096,"
                           "blockio.physical_block_size=4096", "--network", "none", "--graphics", "none"],
    "cdrom-media-sata": ["--memory", "256", "--machine", "q35", "--import", "--disk", DISK_A,
                         "--disk", f"path={D}/seed.iso,device=cdrom,bus=sata",
                         "--network", "none", "--graphics", "none"],
    "cdrom-empty-ide": ["--memory", "256", "--machine", "pc", "--import", "--disk", DISK_A,
                        "--disk", "device=cdrom,bus=ide", "--network", "none", "--graphics", "none"],
    "cdrom-empty-scsi": ["--memory", "256", "--import", "--disk", DISK_A, "--controller", "scsi,model=virtio-scsi",
                         "--disk", "device=cdrom,bus=scsi", "--network", "none", "--graphics", "none"],
    "floppy": ["--memory", "256", "--machine", "pc", "--import", "--disk", DISK_A,
               "--disk", f"path={D}/b.raw,format=raw,device=floppy", "--network", "none", "--graphics", "none"],
    "disk-none-pxe": ["--memory", "256", "--pxe", "--disk", "none", "--network", NET, "--graphics", "none",
                      "--print-xml", "1"],
    # network interfaces
    "nic-virtio": ["--memory", "256", "--import", "--disk", DISK_A, "--network", f"{NET},model=virtio",
                   "--graphics", "none"],
    "nic-e1000": ["--memory", "256", "--import", "--disk", DISK_A, "--network", f"{NET},model=e1000",
                  "--graphics", "none"],
    "nic-e1000e": ["--memory", "256", "--machine", "q35", "--import", "--disk", DISK_A,
                   "--network", f"{NET},model=e1000e", "--graphics", "none"],
    "nic-rtl8139": ["--memory", "256", "--import", "--disk", DISK_A, "--network", f"{NET},model=rtl8139",
                    "--graphics", "none"],
    "nic-two-macs": ["--memory", "256", "--import", "--disk", DISK_A,
                     "--network", f"{NET},model=virtio,mac=52:54:00:10:20:30",
                     "--network", f"{NET},model=e1000,mac=52:54:00:10:20:31", "--graphics", "none"],
    "nic-virtio-queues-mtu": ["--memory", "256", "--import", "--disk", DISK_A,
                              "--network", f"{NET},model=virtio,driver.name=vhost,driver.queues=4,mtu.size=1400",
                              "--graphics", "none"],
    "nic-bridge": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "bridge=vmfcorpusbr0,model=virtio",
                   "--graphics", "none"],
    "nic-link-down-bootorder": ["--memory", "256", "--import", "--disk", DISK_A,
                                "--network", f"{NET},model=virtio,link.state=down,boot.order=1",
                                "--graphics", "none"],
    "nic-none": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none"],
    # graphics and video
    "gfx-vnc-listen-all": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none",
                           "--graphics", "vnc,listen=0.0.0.0", "--video", "vga"],
    "gfx-vnc-port-keymap": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none",
                            "--graphics", "vnc,port=5977,keymap=en-us,password=letmein", "--video", "cirrus"],
    "gfx-vnc-socket": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none",
                       "--graphics", "vnc,listen=socket", "--video", "bochs"],
    "gfx-spice-qxl": ["--memory", "256", "--machine", "q35", "--import", "--disk", DISK_A, "--network", "none",
                      "--graphics", "spice,listen=127.0.0.1", "--video", "qxl", "--channel", "spicevmc"],
    "gfx-spice-none-virtio": ["--memory", "256", "--machine", "q35", "--import", "--disk", DISK_A, "--network", "none",
                              "--graphics", "spice,listen=none", "--video", "virtio"],
    "gfx-spice-opts": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none",
                       "--graphics", "spice,image.compression=auto_glz,streaming.mode=filter,clipboard.copypaste=no,"
                                     "mouse.mode=client,filetransfer.enable=no",
                       "--video", "qxl,ram=65536,vram=65536,vgamem=16384,heads=1"],
    "gfx-vnc-ramfb": ["--memory", "256", "--machine", "q35", "--import", "--disk", DISK_A, "--network", "none",
                      "--graphics", "vnc", "--video", "ramfb"],
    "gfx-none-video-none": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none",
                            "--graphics", "none", "--video", "none"],
    "gfx-virtio-3d-off": ["--memory", "256", "--machine", "q35", "--import", "--disk", DISK_A, "--network", "none",
                          "--graphics", "vnc", "--video", "virtio,accel3d=no"],
    # consoles, serials and channels
    "chr-serial-pty-console": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none",
                               "--graphics", "none", "--serial", "pty", "--console", "pty,target.type=virtio"],
    "chr-serial-file-tcp": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                            "--serial", f"file,path={D}/serial.log",
                            "--serial", "tcp,host=127.0.0.1:4555,mode=bind,protocol.type=telnet"],
    "chr-serial-unix": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                        "--serial", f"unix,path={D}/serial.sock,mode=bind"],
    "chr-guest-agent": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                        "--channel", "unix,target.type=virtio,target.name=org.qemu.guest_agent.0"],
    "chr-spicevmc-vdagent": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none",
                             "--graphics", "spice", "--channel", "spicevmc", "--channel", "qemu-vdagent,target.type=virtio,"
                             "target.name=com.redhat.spice.0,source.clipboard.copypaste=on"],
    "chr-pty-channel-guestfwd": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none",
                                 "--graphics", "none", "--channel", "pty,target.type=virtio,target.name=org.example.pty"],
    # other devices
    "dev-rng-urandom": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                        "--rng", "/dev/urandom"],
    "dev-rng-builtin-rate": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                             "--rng", "builtin,rate.bytes=1024,rate.period=1000"],
    "dev-rng-egd": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                    "--rng", "egd,backend.type=tcp,backend.source.host=127.0.0.1,backend.source.service=7777,"
                             "backend.source.mode=connect"],
    "dev-tpm-crb": ["--memory", "256", "--machine", "q35", "--import", "--disk", DISK_A, "--network", "none",
                    "--graphics", "none", "--tpm", "emulator,model=tpm-crb,version=2.0"],
    "dev-tpm-tis": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                    "--tpm", "emulator,model=tpm-tis,version=2.0"],
    "dev-tpm-tis-12": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                       "--tpm", "emulator,model=tpm-tis,version=1.2"],
    "dev-watchdog-i6300esb": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none",
                              "--graphics", "none", "--watchdog", "i6300esb,action=reset"],
    "dev-watchdog-ib700": ["--memory", "256", "--machine", "pc", "--import", "--disk", DISK_A, "--network", "none",
                           "--graphics", "none", "--watchdog", "ib700,action=poweroff"],
    "dev-fs-9p": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                  "--filesystem", f"{D}/share,share0,accessmode=mapped"],
    "dev-fs-9p-readonly": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                           "--filesystem", f"source={D}/share,target=ro0,readonly=on,accessmode=squash"],
    "dev-fs-virtiofs": ["--memory", "512", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                        "--memorybacking", "source.type=memfd,access.mode=shared",
                        "--filesystem", f"{D}/share,share0,driver.type=virtiofs"],
    "dev-sound-ich9": ["--memory", "256", "--machine", "q35", "--import", "--disk", DISK_A, "--network", "none",
                       "--graphics", "vnc", "--sound", "ich9"],
    "dev-sound-ac97": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none",
                       "--graphics", "vnc", "--sound", "ac97"],
    "dev-input-tablet-kbd": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "vnc",
                             "--input", "tablet,bus=usb", "--input", "keyboard,bus=virtio"],
    "dev-controllers": ["--memory", "256", "--machine", "q35", "--import", "--disk", DISK_A, "--network", "none",
                        "--graphics", "none", "--controller", "usb,model=qemu-xhci",
                        "--controller", "virtio-serial", "--controller", "scsi,model=virtio-scsi,driver.queues=2"],
    "dev-usb-none": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                     "--controller", "usb,model=none"],
    "dev-smartcard-redirdev": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none",
                               "--graphics", "spice", "--smartcard", "passthrough,type=spicevmc",
                               "--redirdev", "usb,type=spicevmc", "--redirdev", "usb,type=spicevmc"],
    "dev-panic-isa": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                      "--panic", "isa"],
    "dev-vsock": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                  "--vsock", "cid.auto=no,cid.address=42"],
    "dev-iommu-intel": ["--memory", "256", "--machine", "q35", "--import", "--disk", DISK_A, "--network", "none",
                        "--graphics", "none", "--features", "ioapic.driver=qemu", "--iommu", "intel,driver.intremap=on"],
    "dev-shmem": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                  "--shmem", "name=vmfshm,model.type=ivshmem-plain,size=4,size.unit=M"],
    # platform
    "plat-clock-localtime": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                             "--clock", "offset=localtime,hpet_present=yes,kvmclock_present=no"],
    "plat-clock-variable": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                            "--clock", "offset=variable",
                            "--xml", "./clock/@adjustment=3600", "--xml", "./clock/@basis=utc"],
    "plat-features-hyperv": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                             "--features", "hyperv_relaxed=on,hyperv_vapic=on,hyperv_spinlocks=on,"
                                           "hyperv_spinlocks_retries=8191,vmport=off,pmu.state=off"],
    "plat-features-smm": ["--memory", "256", "--machine", "q35", "--import", "--disk", DISK_A, "--network", "none",
                          "--graphics", "none", "--features", "smm.state=on,kvm_hidden=on"],
    "plat-events": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                    "--events", "on_poweroff=destroy,on_reboot=destroy,on_crash=preserve"],
    "plat-resource": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                      "--resource", "/machine"],
    "plat-sysinfo": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                     "--sysinfo", "type=smbios,bios.vendor=vmform,system.manufacturer=vmform,system.product=corpus,"
                                  "system.serial=0042"],
    "plat-metadata": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                      "--metadata", "title=A corpus guest,description=Defined by the corpus generator"],
    "plat-pm": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                "--pm", "suspend_to_mem.enabled=on,suspend_to_disk.enabled=on"],
    "plat-seclabel-none": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                           "--seclabel", "type=none"],
    "plat-idmap-keywrap": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none", "--graphics", "none",
                           "--keywrap", "cipher0.name=aes,cipher0.state=on"],
    "plat-qemu-commandline": ["--memory", "256", "--import", "--disk", DISK_A, "--network", "none",
                              "--graphics", "none", "--qemu-commandline=-no-user-config"],
    # a "normal" guest, several things at once
    "combo-server-q35-uefi": ["--memory", "1024", "--vcpus", "2", "--machine", "q35", "--boot", "uefi",
                              "--cpu", "host-passthrough", "--import",
                              "--disk", f"{DISK_A},bus=virtio,cache=none,io=native,discard=unmap",
                              "--disk", f"path={D}/seed.iso,device=cdrom,bus=sata",
                              "--network", f"{NET},model=virtio", "--graphics", "none",
                              "--channel", "unix,target.type=virtio,target.name=org.qemu.guest_agent.0",
                              "--rng", "/dev/urandom", "--memballoon", "virtio,stats.period=5"],
    "combo-desktop-pc": ["--memory", "2048", "--vcpus", "2", "--machine", "pc", "--import",
                         "--disk", f"path={D}/a.raw,format=raw,bus=ide", "--disk", "device=cdrom,bus=ide",
                         "--network", f"{NET},model=rtl8139", "--graphics", "vnc,listen=127.0.0.1",
                         "--video", "vga", "--sound", "ac97", "--input", "tablet,bus=usb"],
    "combo-cdrom-install": ["--memory", "512", "--cdrom", f"{D}/seed.iso", "--disk", DISK_A,
                            "--network", f"{NET},model=e1000", "--graphics", "vnc", "--print-xml", "1"],
    "combo-location-install": ["--memory", "512", "--disk", DISK_A, "--network", f"{NET},model=virtio",
                               "--graphics", "none", "--boot", f"kernel={D}/a.raw,initrd={D}/b.raw"],
}


def _prepare() -> None:
    GENDIR.mkdir(parents=True, exist_ok=True)
    for name, kind in FILES.items():
        path = GENDIR / name
        if kind == "dir":
            path.mkdir(exist_ok=True)
        elif not path.exists():
            if kind == "qcow2":
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
            else:
                with open(path, "wb") as image:
                    image.truncate(16 * 1024 * 1024)


def portable(xml: str, name: str) -> str:
    xml = re.sub(r"\s*<uuid>[^<]*</uuid>", "", xml)
    xml = xml.replace(f"<name>{name}</name>", "<name>NAME_PLACEHOLDER</name>")
    xml = xml.replace(str(GENDIR), "DISKDIR_PLACEHOLDER")
    xml = xml.replace(f'<source network="{NETWORK}"', '<source network="NETWORK_PLACEHOLDER"')
    if name in xml:
        raise ValueError(f"{name} still appears in the document")
    return xml


def concrete(xml: str, name: str, diskdir: str, network: str) -> str:
    return (xml.replace("NAME_PLACEHOLDER", name).replace("DISKDIR_PLACEHOLDER", diskdir)
            .replace("NETWORK_PLACEHOLDER", network))


def main() -> int:
    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open("qemu:///system")
    _prepare()
    chosen = sys.argv[1:] or list(CASES)
    unknown = [case for case in chosen if case not in CASES]
    if unknown:
        print(f"unknown cases: {unknown}")
        return 2
    if not sys.argv[1:]:
        for old in HERE.glob("*.xml"):
            old.unlink()
    pools_before = {pool.name() for pool in conn.listAllStoragePools()}
    try:
        failed = _generate(conn, chosen)
    finally:
        # virt-install defines a pool for the directory the images are in: remove what it made.
        for pool in conn.listAllStoragePools():
            if pool.name() not in pools_before:
                if pool.isActive():
                    pool.destroy()
                pool.undefine()
    print(f"{len(chosen) - failed} written, {failed} skipped")
    return 0


def _generate(conn: Any, chosen: list[str]) -> int:
    failed = 0
    for case in chosen:
        options = CASES[case]
        name = f"vmfgen-{case}"
        command = [*VIRT_INSTALL, "--name", name, *options]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"SKIP {case}: virt-install: {done.stderr.strip().splitlines()[-1:]}")
            failed += 1
            continue
        xml = portable(done.stdout, name)
        check_name = f"vmftest-corpusgen-{case}"
        try:
            domain = conn.defineXML(concrete(xml, check_name, str(GENDIR), NETWORK))
            domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        except libvirt.libvirtError as exc:
            print(f"SKIP {case}: libvirt refuses it at define: {exc.get_error_message()}")
            failed += 1
            continue
        (HERE / f"{case}.xml").write_text(xml)
        print(f"ok   {case}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
