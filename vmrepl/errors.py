"""The one error hierarchy of vmrepl.

Every error carries the one-line message the CLI prints, its exit status, and whether a
retry may succeed (the replication driver retries only those)::

    VmreplError                  exit 1; message printed as is
     +-- UsageError              exit 2; bad arguments or names (`..`, `/`, unknown spec)
     +-- StateError              the state dir or catalog cannot be used (permissions, newer schema)
     +-- NotFoundError           unknown VM, snapshot, disk or host entry
     +-- LockedError             another vmrepl run holds this VM (retryable)
     +-- SourceError             libvirt / QEMU / qemu-img refused or failed on the source
     |    +-- UnsupportedDiskError   a disk vmrepl cannot track (raw, network, ...)
     |    +-- HookError              a user pre/post hook failed
     +-- QemuError               qemu-img or qemu-storage-daemon refused or failed (either host)
     +-- ChangeTrackingError     a dirty bitmap is missing or inconsistent (callers fall back)
     +-- TransportError          ssh could not connect or the connection dropped (retryable)
     |    +-- HostKeyError           unknown or changed host key
     |    +-- AuthError              the key was refused
     +-- ProtocolError           the stream is not the protocol: bad magic, version, limit, checksum
     +-- SinkError               the destination could not store what it received
          +-- NoSpaceError           the destination's disk is full (retryable once space is freed)
"""

from __future__ import annotations


class VmreplError(Exception):
    """Root of vmrepl's errors; `str(err)` is the one line shown to the user."""

    exit_code = 1
    retryable = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class UsageError(VmreplError):
    exit_code = 2


class StateError(VmreplError):
    pass


class NotFoundError(VmreplError):
    pass


class LockedError(VmreplError):
    retryable = True


class SourceError(VmreplError):
    pass


class UnsupportedDiskError(SourceError):
    pass


class HookError(SourceError):
    pass


class QemuError(VmreplError):
    pass


class ChangeTrackingError(VmreplError):
    pass


class TransportError(VmreplError):
    retryable = True


class HostKeyError(TransportError):
    retryable = False


class AuthError(TransportError):
    retryable = False


class ProtocolError(VmreplError):
    pass


class SinkError(VmreplError):
    pass


class NoSpaceError(SinkError):
    retryable = True
