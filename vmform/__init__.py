"""vmform: declarative KVM/QEMU hosts through libvirt."""

__version__ = "0.1.0"
