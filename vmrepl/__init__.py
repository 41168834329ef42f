"""vmrepl: replicate libvirt/QEMU VM snapshots over SSH, sending only what changed."""

__version__ = "0.1.0"
