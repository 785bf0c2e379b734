#!/bin/bash
# Generates the vi-*.xml domain samples with virt-install (dry run: nothing is defined).
# doc-*.xml and the network/pool samples are written by hand after libvirt's documentation;
# live-*.xml are libvirt's own formatting of them (generate_live.py, in-memory test driver).
out="$(cd "$(dirname "$0")" && pwd)/domains"
VI="virt-install --print-xml --dry-run --connect qemu:///system --virt-type qemu --osinfo detect=on,require=off --noautoconsole"
run() { name=$1; shift; if $VI --name "$name" "$@" > "$out/$name.xml" 2> "$out/.$name.err"; then echo "ok $name"; else echo "FAIL $name"; cat $out/.$name.err; rm -f "$out/$name.xml"; fi; }

run vi-minimal --memory 512 --vcpus 1 --disk none --import

run vi-q35-uefi --machine q35 --boot uefi --memory 2048 --vcpus 4 --import \
  --disk size=10,bus=virtio,cache=none,io=native,discard=unmap,format=qcow2,path=/var/lib/libvirt/images/vi-q35-uefi.qcow2 \
  --network network=default,model=virtio --graphics vnc,listen=0.0.0.0,port=5901 --video virtio \
  --channel unix,target.type=virtio,target.name=org.qemu.guest_agent.0 --rng /dev/urandom --tpm emulator,model=tpm-crb,version=2.0 \
  --watchdog i6300esb,action=reset --memballoon virtio

run vi-cpu-numa --machine q35 --memory 4096 --vcpus 8,sockets=2,cores=2,threads=2 \
  --cpu host-passthrough,cache.mode=passthrough,+vmx,-svm,cell0.memory=2097152,cell0.cpus=0-3,cell1.memory=2097152,cell1.cpus=4-7 \
  --memorybacking hugepages=on --iothreads 2 --numatune 0-1,mode=strict --import --disk none \
  --cputune vcpupin0.vcpu=0,vcpupin0.cpuset=0,vcpupin1.vcpu=1,vcpupin1.cpuset=1 --network none --graphics none

run vi-disks --memory 1024 --vcpus 2 --import \
  --disk path=/var/lib/libvirt/images/a.qcow2,size=1,bus=virtio,cache=writeback,format=qcow2 \
  --disk path=/var/lib/libvirt/images/b.raw,size=1,bus=sata,cache=writethrough,format=raw \
  --disk path=/var/lib/libvirt/images/c.img,size=1,bus=scsi,cache=directsync,format=raw \
  --disk path=/var/lib/libvirt/images/d.img,size=1,bus=usb,cache=unsafe,format=raw,readonly=on \
  --disk device=cdrom,bus=sata \
  --controller type=scsi,model=virtio-scsi \
  --network bridge=br0,model=e1000e,mac=52:54:00:12:34:56 --network network=default,model=rtl8139 \
  --graphics spice,listen=none --video qxl --channel spicevmc --sound ich9 --audio type=spice

run vi-devices --machine q35 --memory 2048 --vcpus 2 --import --disk none \
  --filesystem /srv/share,share0,driver.type=virtiofs --memorybacking source.type=memfd,access.mode=shared \
  \
  --clock offset=localtime,hpet_present=no,rtc_tickpolicy=catchup,pit_tickpolicy=delay \
  --pm suspend_to_mem.enabled=off,suspend_to_disk.enabled=off \
  --features kvm_hidden=on,hyperv_relaxed=on,hyperv_vapic=on,hyperv_spinlocks=on,hyperv_spinlocks_retries=8191,smm.state=on \
  --serial pty --console pty,target.type=virtio --input keyboard,bus=virtio --input mouse,bus=usb \
  --smartcard mode=passthrough,type=spicevmc --redirdev usb,type=spicevmc --panic isa \
  --memballoon virtio,stats.period=10 --controller usb,model=qemu-xhci \
  --network network=default,model=virtio,driver.name=vhost,driver.queues=4 --graphics spice,gl.enable=no \
  --events on_poweroff=destroy,on_reboot=restart,on_crash=coredump-restart \
  --resource /machine --sysinfo host --metadata title=Demo,description=A\ demo\ guest \
  --iothreads iothreads=4 --blkiotune weight=300 --memtune hard_limit=4194304 --vcpus 2,maxvcpus=4

run vi-launch --machine q35 --memory 1024 --vcpus 2 --disk none --import --network none \
  --boot uefi,loader.secure=yes,menu=on,bootmenu.timeout=3000,useserial=on --graphics vnc,password=secret,keymap=de \
  --sound model=ich6 --channel unix,target.type=virtio,target.name=org.libvirt.test --controller type=virtio-serial \
  --vsock cid.auto=yes --iommu model=intel,driver.intremap=on --rng builtin --features ioapic.driver=qemu --seclabel type=dynamic,model=selinux \
  --qemu-commandline='-display none' --qemu-commandline env=FOO=bar --xml ./devices/emulator=/usr/bin/qemu-system-x86_64

rm -f "$out"/.*.err
# virt-install 4.1 writes <audio> without the id this libvirt's schema requires
sed -i 's#<audio type="spice"/>#<audio id="1" type="spice"/>#' "$out/vi-disks.xml"
