"""Throwaway no-OS VMs under libvirt for tests and the demo.

Each VM is a persistent q35 domain with 64 MiB RAM, no network, no graphics and virtio qcow2 disks
(cluster 64 KiB) in run/vms/NAME/ (mode 0755, so libvirt-qemu can open them). Its name is
`vmrepl-test-PID-N-LABEL`, PID being the process that made it: `cleanup_leftovers` removes the VMs
and files of processes that are gone (a killed test run) without touching those of a live one.

Disk contents are changed from the host: through HMP `qemu-io` while the VM runs, or with `qemu-io`
on the current image while it is shut off; `read_matches` checks an image (through its backing
chain) without taking its lock.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import signal
import stat
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

import libvirt
import libvirt_qemu

from . import RUN_DIR, pid_alive, public_dir, run

KiB = 1 << 10
MiB = 1 << 20
PREFIX = "vmrepl-test-"
VMS_DIR = RUN_DIR / "vms"
CLUSTER_SIZE = 64 * KiB
DEFAULT_DISKS: Mapping[str, int] = {"vda": 64 * MiB, "vdb": 32 * MiB}
UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                  | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)

_OWNER = re.compile(rf"{re.escape(PREFIX)}(\d+)-")
_counter = itertools.count(1)


def vm_name(label: str = "vm") -> str:
    """A fresh domain name owned by this process; use it also for domains vmrepl creates in tests
    (`recover --as`, `clone`), so that cleanup finds them."""
    return f"{PREFIX}{os.getpid()}-{next(_counter)}-{label}"


@functools.cache
def domain_type(uri: str = "qemu:///system") -> str:
    """'kvm' when libvirt can use /dev/kvm for q35 guests, else 'qemu' (TCG)."""
    if not os.path.exists("/dev/kvm"):
        return "qemu"
    conn = libvirt.open(uri)
    try:
        conn.getDomainCapabilities(None, "x86_64", "q35", "kvm")
        return "kvm"
    except libvirt.libvirtError:
        return "qemu"
    finally:
        conn.close()


class VM:
    """A throwaway domain; every query goes to libvirt, since vmrepl changes the domain behind us."""

    def __init__(self, conn: libvirt.virConnect, name: str, directory: Path) -> None:
        self.conn = conn
        self.name = name
        self.dir = directory

    def __repr__(self) -> str:
        return f"VM({self.name!r})"

    @property
    def dom(self) -> libvirt.virDomain:
        return self.conn.lookupByName(self.name)

    @property
    def uuid(self) -> str:
        return self.dom.UUIDString()

    def xml(self) -> ET.Element:
        """The live definition while running, else the persistent one."""
        return ET.fromstring(self.dom.XMLDesc(0))

    def targets(self) -> list[str]:
        return [t.get("dev") for t in self.xml().findall("devices/disk/target")]

    def current_image(self, target: str) -> Path:
        """The file the disk writes to now (an external snapshot replaces it with an overlay)."""
        source = self._disk(target).find("source")
        if source is None or source.get("file") is None:
            raise RuntimeError(f"{self.name}: disk {target} has no file source")
        return Path(source.get("file"))

    def is_running(self) -> bool:
        return bool(self.dom.isActive())

    def start(self) -> None:
        self.dom.create()

    def crash(self) -> None:
        """Kill QEMU with SIGKILL, as a host crash would (images not closed: bitmaps stay `in-use`), and
        wait until libvirt sees the domain stopped."""
        os.kill(int(Path(f"/run/libvirt/qemu/{self.name}.pid").read_text()), signal.SIGKILL)
        for _ in range(100):
            if not self.is_running():
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} still runs 10 s after its QEMU was killed")

    def shutoff(self) -> None:
        """Power off at once (there is no OS to shut down); QEMU still closes its images cleanly."""
        if self.is_running():
            self.dom.destroy()

    def write_pattern(self, target: str, offset: int, length: int, byte: int) -> None:
        """Fill [offset, offset+length) of the disk with `byte`, as if the guest had written it."""
        self._qemu_io(target, offset, length, f"write -P {byte:#x} {offset} {length}")

    def write_zeroes(self, target: str, offset: int, length: int) -> None:
        """Write zeroes to [offset, offset+length) of the disk (a zero write, not data)."""
        self._qemu_io(target, offset, length, f"write -z {offset} {length}")

    def write_file(self, target: str, offset: int, source: Path) -> None:
        """Copy the file `source` to `offset` of the disk (e.g. incompressible data); QEMU reads the
        file itself, so it must be readable by the libvirt-qemu user."""
        # HMP qemu-io reports a file it cannot open only in QEMU's log, and writes nothing: QEMU runs as
        # libvirt-qemu with another working directory, so the path must be absolute and readable by all.
        source = source.resolve()
        if not all(d.stat().st_mode & stat.S_IXOTH for d in source.parents) or \
                not source.stat().st_mode & stat.S_IROTH:
            raise PermissionError(f"{source}: QEMU (libvirt-qemu) cannot read it; make it and its directories public")
        length = source.stat().st_size
        self._qemu_io(target, offset, length, f"write -s {source} {offset} {length}")

    def write_random(self, target: str, offset: int, length: int) -> None:
        """Fill [offset, offset+length) with random (incompressible) bytes, as the guest would."""
        source = self.dir / f".random-{os.getpid()}-{offset}.bin"
        source.write_bytes(os.urandom(length))
        source.chmod(0o644)
        try:
            self.write_file(target, offset, source)
        finally:
            source.unlink()

    def remove(self) -> None:
        """Destroy and undefine the domain (with its snapshot and checkpoint metadata), delete its files."""
        remove_domain(self.conn, self.name)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _disk(self, target: str) -> ET.Element:
        for disk in self.xml().findall("devices/disk"):
            t = disk.find("target")
            if t is not None and t.get("dev") == target:
                return disk
        raise KeyError(f"{self.name} has no disk {target}")

    def _qemu_io(self, target: str, offset: int, length: int, command: str) -> None:
        # HMP qemu-io reports I/O errors only in QEMU's log, so refuse what would fail here.
        capacity = self.dom.blockInfo(target)[0]
        if offset < 0 or length <= 0 or offset + length > capacity:
            raise ValueError(f"{self.name}: [{offset}, {offset + length}) is outside disk {target} ({capacity} bytes)")
        if not self.is_running():
            run(["qemu-io", "-f", "qcow2", "-c", command, self.current_image(target)])
            return
        alias = self._disk(target).find("alias")
        if alias is None:
            raise RuntimeError(f"{self.name}: disk {target} has no alias in the live XML")
        device = f"/machine/peripheral/{alias.get('name')}/virtio-backend"
        for cmd in (command, "flush"):  # other readers see the write only after a flush
            out = libvirt_qemu.qemuMonitorCommand(
                self.dom, f'qemu-io -d {device} "{cmd}"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
            if "error" in out.lower() or "failed" in out.lower():
                raise RuntimeError(f"{self.name}: HMP qemu-io {cmd!r} on {target}: {out.strip()}")


# Secure boot needs SMM, which KVM inside a VM (these machines) does not offer.
EFI_WITHOUT_SMM = ("<firmware><feature enabled='no' name='secure-boot'/><feature enabled='no' name='enrolled-keys'/>"
                   "</firmware>")


def create_vm(conn: libvirt.virConnect, disks: Mapping[str, int] | None = None, *, label: str = "vm",
              start: bool = True, firmware: str = "bios") -> VM:
    """Define (and by default start) a VM with one empty qcow2 image per disk, `{target: size}`;
    `firmware='efi'`: UEFI (OVMF, chosen by libvirt), with a variable store of its own."""
    name = vm_name(label)
    efi = firmware == "efi"
    directory = public_dir(VMS_DIR / name)
    disk_xml = []
    for target, size in (disks or DEFAULT_DISKS).items():
        image = directory / f"{target}.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER_SIZE}", image, str(size)])
        disk_xml.append(f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{image}'/>
      <target dev='{target}' bus='virtio'/>
    </disk>""")
    conn.defineXML(f"""<domain type='{domain_type(conn.getURI())}'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os{" firmware='efi'" if efi else ""}><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/>
    {EFI_WITHOUT_SMM if efi else ""}</os>
  {"<features><acpi/><smm state='off'/></features>" if efi else ""}
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>{''.join(disk_xml)}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>""")
    vm = VM(conn, name, directory)
    if start:
        vm.start()
    return vm


def remove_domain(conn: libvirt.virConnect, name: str) -> None:
    """Destroy and undefine a domain if it exists (its files stay)."""
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefineFlags(UNDEFINE_FLAGS)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # gone meanwhile is fine
            raise


def cleanup_leftovers(conn: libvirt.virConnect, *, owner: int | None = None) -> list[str]:
    """Remove the test domains and VM dirs of processes that are gone (a killed run), and those of
    process `owner` if given (a session ending); returns the names removed."""
    removed = []
    for dom in conn.listAllDomains():
        if _removable(dom.name(), owner):
            remove_domain(conn, dom.name())
            removed.append(dom.name())
    if VMS_DIR.is_dir():
        for directory in VMS_DIR.iterdir():
            if _removable(directory.name, owner):
                shutil.rmtree(directory, ignore_errors=True)
                if directory.name not in removed:
                    removed.append(directory.name)
    return removed


def _removable(name: str, owner: int | None) -> bool:
    if not name.startswith(PREFIX):
        return False
    match = _OWNER.match(name)
    return match is None or int(match.group(1)) == owner or not pid_alive(int(match.group(1)))


def qemu_io(image: Path | str, *commands: str) -> None:
    """Run qemu-io commands on a qcow2 image no one else has open; any error fails."""
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    proc = run([*args, image])
    if "error" in (proc.stdout + proc.stderr).lower():
        raise RuntimeError(f"qemu-io on {image}: {(proc.stdout + proc.stderr).strip()}")


def read_matches(image: Path | str, offset: int, length: int, byte: int) -> bool:
    """True when every byte of [offset, offset+length) of the qcow2 image (through its backing chain)
    is `byte`; opens the image read-only without its lock, so it works on a running VM's disk too."""
    proc = run(["qemu-io", "-U", "-r", "-f", "qcow2", "-c", f"read -P {byte:#x} {offset} {length}", image],
               check=False)
    if "Pattern verification failed" in proc.stdout:
        return False
    if proc.returncode != 0 or "read " not in proc.stdout:
        raise RuntimeError(f"qemu-io read on {image} failed: {(proc.stderr or proc.stdout).strip()}")
    return True
