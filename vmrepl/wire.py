"""The replication stream between `vmrepl replicate` (sender) and `vmrepl receive` (receiver).

docs/FORMAT.md describes it byte by byte; this module is its only encoder and parser. Each side's
stream opens with MAGIC, then frames. Control frames carry strictly checked JSON; the bulk frames
(DATA, ZERO, DISK_END, TRAILER) are fixed `struct` layouts. Every frame carries a checksum, and the
writer and reader share one bookkeeping class (`_SnapshotStream`) so both compute the same per-disk
and per-snapshot digests and enforce the same order: disks in header order, extents ascending.

Anything that is not the protocol raises ProtocolError with a one-line message; an ERROR frame from
the peer is returned by `read()` as `Error` and raised (as the error class it names) by `expect()`.
"""

from __future__ import annotations

import json
import re
import struct
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

import xxhash
import zstandard

from . import errors
from .errors import ProtocolError, UsageError
from .names import safe_name

MAGIC = b"\x89VMREPL\n"
PROTOCOL_VERSION = 3

# Hard limits: the reader refuses anything larger before allocating for it.
MAX_DATA = 4 << 20                  # uncompressed bytes in one DATA frame
MAX_DISKS = 64
MAX_DEFINITION = 1 << 20            # VM definition XML, in UTF-8 bytes
MAX_HELD = 100_000                  # snapshots listed in a receiver hello
MAX_VERIFY = 10_000                 # snapshot ids in one verify exchange
MAX_ERROR = 1000                    # characters in an ERROR line
MAX_TEXT = 256                      # characters of a VM name
MAX_VIRTUAL_SIZE = 1 << 60
MAX_QUOTE = 80                      # characters of untrusted text quoted in an error
BLOCK_DIGEST_HEX = 32               # xxh3_128, in BLOCKS_REPLY
CONTENT_DIGEST_HEX = 64             # blake2b-256 (vmrepl/digest.py), in VERIFY_REPLY
MAX_BLOCKS = 1 << 18                 # blocks in one block-digest exchange (256 GiB at 1 MiB)

CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_NAMES = {CODEC_RAW: "raw", CODEC_ZSTD: "zstd"}
ZSTD_LEVEL = 1
# zstd is kept only when it saves at least this fraction; otherwise the frame goes raw.
MIN_SAVING = 0.10
# Below this size a payload is copied into the frame buffer; above it, straight to the stream. Each
# write to the ssh channel costs a Python round through paramiko per packet, so small frames (a 64 KiB
# extent, its head) are gathered into writes of about _BUFFER; copying them is far cheaper.
_COPY_LIMIT = 1 << 20
_BUFFER = 1 << 20

# Frame types, one ASCII letter each so a hex dump reads.
T_HELLO = ord("H")
T_RECEIVER_HELLO = ord("h")
T_SNAPSHOT = ord("S")
T_DATA = ord("D")
T_ZERO = ord("Z")
T_DISK_END = ord("d")
T_TRAILER = ord("T")
T_OK = ord("K")
T_ERROR = ord("E")
T_VERIFY = ord("V")
T_VERIFY_REPLY = ord("v")
T_BLOCKS = ord("B")
T_BLOCKS_REPLY = ord("b")
T_END = ord("Q")

_JSON_HEAD = struct.Struct(">BI")          # type, body length; then body, then xxh3_64 of both
_CHECK64 = struct.Struct(">Q")
_DATA_HEAD = struct.Struct(">BBQII")       # type, codec, offset, length, payload length
_DATA = struct.Struct(">BBQII16s")         # ... then xxh3_128 of _DATA_HEAD and the uncompressed data
_ZERO_HEAD = struct.Struct(">BQQ")         # type, offset, length
_ZERO = struct.Struct(">BQQQ")             # ... then xxh3_64 of _ZERO_HEAD
_DISK_END_HEAD = struct.Struct(">BQ16s")   # type, extent count, disk digest
_DISK_END = struct.Struct(">BQ16sQ")       # ... then xxh3_64 of _DISK_END_HEAD
_TRAILER_HEAD = struct.Struct(">B16s")     # type, snapshot digest
_TRAILER = struct.Struct(">B16sQ")         # ... then xxh3_64 of _TRAILER_HEAD


# --- messages -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hello:
    """Sender -> receiver, first frame: which VM this session is about. `since_generation`: the oldest
    generation the sender still holds of it, so the receiver lists only the ghosts the sender could
    still send (their number then follows the source's retention, not the destination's history)."""
    vm_uuid: str
    vm_name: str
    since_generation: int = 0
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class HeldSnapshot:
    id: str
    parent: str | None
    created_ns: int
    generation: int


@dataclass(frozen=True)
class Partial:
    """A transfer the receiver can resume: per disk target, an offset below which every extent
    of that stream is stored durably."""
    snapshot: str
    base: str | None
    disks: dict[str, int]


@dataclass(frozen=True)
class ReceiverHello:
    """Receiver -> sender, first frame: what the receiver holds of the VM named in the hello, and
    which of its snapshots were pruned there (not to be sent again unless asked for by name)."""
    snapshots: tuple[HeldSnapshot, ...] = ()
    partial: Partial | None = None
    pruned: tuple[str, ...] = ()
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class DiskInfo:
    target: str
    virtual_size: int
    cluster_size: int


@dataclass(frozen=True)
class SnapshotHeader:
    """Opens one snapshot transfer. `resume` maps a disk target to the offset this stream starts
    at (a resumed transfer); a disk not in it starts at 0."""
    id: str
    name: str
    parent: str | None
    base: str | None
    created_ns: int
    generation: int
    definition: str
    disks: tuple[DiskInfo, ...]
    resume: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Data:
    """`data` (uncompressed, len(data) bytes) belongs at `offset` of `disk`. `wire_bytes` is what the
    frame cost on the wire."""
    disk: str
    offset: int
    data: bytes | bytearray
    wire_bytes: int = 0


@dataclass(frozen=True)
class Zero:
    """`length` bytes at `offset` of `disk` read as zeros."""
    disk: str
    offset: int
    length: int


@dataclass(frozen=True)
class DiskEnd:
    disk: str
    extents: int
    digest: str


@dataclass(frozen=True)
class Trailer:
    """Closes a snapshot transfer; the reader has checked every digest when it returns this."""
    snapshot: str
    digest: str


@dataclass(frozen=True)
class Ok:
    """Receiver -> sender: the snapshot is committed."""
    snapshot: str


@dataclass(frozen=True)
class Error:
    """Either side: a one-line refusal or failure; `kind` names a vmrepl.errors class."""
    message: str
    kind: str = "VmreplError"

    @classmethod
    def from_exception(cls, err: BaseException) -> Error:
        kind = type(err).__name__ if isinstance(err, errors.VmreplError) else "VmreplError"
        return cls(message=str(err), kind=kind)

    def exception(self, peer: str) -> errors.VmreplError:
        cls = getattr(errors, self.kind, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.VmreplError)):
            cls = errors.VmreplError
        return cls(f"{peer}: {self.message}")


@dataclass(frozen=True)
class VerifyRequest:
    snapshots: tuple[str, ...]


@dataclass(frozen=True)
class VerifyReply:
    """Per snapshot id: per disk target a hex content digest, or None when the receiver lacks it."""
    digests: dict[str, dict[str, str] | None]


@dataclass(frozen=True)
class BlockDigestRequest:
    """Sender -> receiver, between transfers: digests of these blocks of a held snapshot's disk, for a
    sender that cannot tell from its change tracking what changed since that snapshot."""
    snapshot: str
    disk: str
    block_size: int
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class BlockDigestReply:
    """One digest per requested block (block_digest of its content), None where the receiver has none."""
    digests: tuple[str | None, ...]


def block_digest(data: bytes | bytearray | memoryview) -> str:
    """What BLOCKS_REPLY carries per block: the xxh3_128 of the block's bytes, as hex."""
    return xxhash.xxh3_128_hexdigest(data)


@dataclass(frozen=True)
class End:
    """Sender -> receiver: clean end of the session."""


Message = (Hello | ReceiverHello | SnapshotHeader | Data | Zero | DiskEnd | Trailer | Ok | Error
           | VerifyRequest | VerifyReply | BlockDigestRequest | BlockDigestReply | End)
M = TypeVar("M")


# --- JSON bodies: strict in both directions -----------------------------------------------------

def _fail(what: str) -> ProtocolError:
    return ProtocolError(f"stream corrupt: {what}", hint="the peer is not a compatible vmrepl; check both versions")


def _corrupt(what: str) -> ProtocolError:
    """A frame whose checksum or digest does not match: damaged in transit or in memory, not a wrong peer."""
    err = ProtocolError(f"stream corrupt: {what}",
                        hint="the data was damaged in transit or in memory; retry, and check the hosts' RAM "
                             "and network if it recurs")
    err.retryable = True
    return err


def _quote(value: str) -> str:
    """`value` (untrusted) as a bounded repr for an error line."""
    return repr(value[:MAX_QUOTE]) + ("..." if len(value) > MAX_QUOTE else "")


def _utf8(value: str) -> bool:
    """JSON escapes can spell lone surrogates, which no UTF-8 string holds."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


class _Fields:
    """Typed access to one decoded JSON object; every key must be read exactly once."""

    def __init__(self, frame: str, obj: Any) -> None:
        if not isinstance(obj, dict):
            raise _fail(f"{frame} body is not an object")
        self.frame, self.obj, self.seen = frame, obj, set()

    def _get(self, key: str) -> Any:
        if key not in self.obj:
            raise _fail(f"{_key(self.frame, key)} missing")
        self.seen.add(key)
        return self.obj[key]

    def integer(self, key: str, maximum: int = (1 << 63) - 1) -> int:
        value = self._get(key)
        if type(value) is not int or not 0 <= value <= maximum:
            raise _fail(f"{_key(self.frame, key)} is not an integer in [0, {maximum}]")
        return value

    def string(self, key: str, limit: int = MAX_TEXT) -> str:
        value = self._get(key)
        if not isinstance(value, str) or len(value) > limit:
            raise _fail(f"{_key(self.frame, key)} is not a string of at most {limit} characters")
        if not _utf8(value):
            raise _fail(f"{_key(self.frame, key)} is not valid Unicode (a lone surrogate)")
        return value

    def name(self, key: str, optional: bool = False) -> str | None:
        value = self._get(key)
        if value is None and optional:
            return None
        return _name(self.frame, key, value)

    def items(self, key: str, limit: int) -> list:
        value = self._get(key)
        if not isinstance(value, list) or len(value) > limit:
            raise _fail(f"{_key(self.frame, key)} is not a list of at most {limit} items")
        return value

    def offsets(self, key: str) -> dict[str, int]:
        value = self._get(key)
        if not isinstance(value, dict) or len(value) > MAX_DISKS:
            raise _fail(f"{_key(self.frame, key)} is not an object of at most {MAX_DISKS} disks")
        return {_name(self.frame, key, k): _Fields(self.frame, {"offset": v}).integer("offset", MAX_VIRTUAL_SIZE)
                for k, v in value.items()}

    def done(self) -> None:
        extra = set(self.obj) - self.seen
        if extra:
            raise _fail(f"{self.frame} has unknown field {_quote(sorted(extra)[0])}")


def _key(frame: str, key: str) -> str:
    return f"{frame} field {key!r}"


def _name(frame: str, key: str, value: Any) -> str:
    """Ids, snapshot names and disk targets end up in paths: only safe names pass."""
    if not isinstance(value, str):
        raise _fail(f"{_key(frame, key)} is not a string")
    try:
        return safe_name(key, value)
    except UsageError:
        raise _fail(f"{_key(frame, key)} is not a safe name: {_quote(value)}") from None


def _text(frame: str, key: str, value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _fail(f"{_key(frame, key)} contains control characters")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _decode_json(frame: str, body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise _fail(f"{frame} body is not valid JSON ({str(err).splitlines()[0][:MAX_QUOTE]})") from None
    except RecursionError:
        # No legal body nests deeper than 3; json recurses per level, so depth must not escape as a crash.
        raise _fail(f"{frame} body nests too deeply") from None


def _hex(frame: str, key: str, value: Any, chars: int) -> str:
    """A digest as docs/FORMAT.md gives it: exactly `chars` lowercase hex characters."""
    if not isinstance(value, str) or not re.fullmatch(f"[0-9a-f]{{{chars}}}", value):
        raise _fail(f"{_key(frame, key)} is not a digest of {chars} hex characters")
    return value


def _version(f: _Fields) -> int:
    """A hello's version, checked before any other field: other versions have other fields."""
    version = f.integer("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (this vmrepl speaks "
                            f"{PROTOCOL_VERSION})", hint="install the same vmrepl version on both hosts")
    return version


def _parse_hello(f: _Fields) -> Hello:
    version = _version(f)
    vm_uuid = f.string("vm_uuid", 36)
    try:
        if str(uuid.UUID(vm_uuid)) != vm_uuid:
            raise ValueError
    except ValueError:
        raise _fail(f"HELLO field 'vm_uuid' is not a lowercase UUID: {_quote(vm_uuid)}") from None
    return Hello(vm_uuid=vm_uuid, vm_name=_text("HELLO", "vm_name", f.string("vm_name")),
                 since_generation=f.integer("since_generation"), version=version)


def _parse_receiver_hello(f: _Fields) -> ReceiverHello:
    version = _version(f)
    held = []
    for item in f.items("snapshots", MAX_HELD):
        s = _Fields("RECEIVER_HELLO snapshot", item)
        held.append(HeldSnapshot(id=s.name("id"), parent=s.name("parent", optional=True),
                                 created_ns=s.integer("created_ns"), generation=s.integer("generation")))
        s.done()
    partial = None
    raw = f._get("partial")
    if raw is not None:
        p = _Fields("RECEIVER_HELLO partial", raw)
        partial = Partial(snapshot=p.name("snapshot"), base=p.name("base", optional=True), disks=p.offsets("disks"))
        p.done()
    pruned = tuple(_name("RECEIVER_HELLO", "pruned", s) for s in f.items("pruned", MAX_HELD))
    return ReceiverHello(snapshots=tuple(held), partial=partial, pruned=pruned, version=version)


def _parse_snapshot(f: _Fields) -> SnapshotHeader:
    disks = []
    for item in f.items("disks", MAX_DISKS):
        d = _Fields("SNAPSHOT disk", item)
        disk = DiskInfo(target=d.name("target"), virtual_size=d.integer("virtual_size", MAX_VIRTUAL_SIZE),
                        cluster_size=d.integer("cluster_size", 2 << 20))
        d.done()
        if disk.cluster_size < 512 or disk.cluster_size & (disk.cluster_size - 1):
            raise _fail(f"SNAPSHOT disk {disk.target} cluster_size {disk.cluster_size} is not a power of 2 >= 512")
        disks.append(disk)
    targets = [d.target for d in disks]
    if len(set(targets)) != len(targets):
        raise _fail("SNAPSHOT lists a disk twice")
    definition = f.string("definition", MAX_DEFINITION)
    if len(definition.encode()) > MAX_DEFINITION:
        raise _fail(f"SNAPSHOT definition is longer than {MAX_DEFINITION} bytes")
    header = SnapshotHeader(id=f.name("id"), name=f.name("name"), parent=f.name("parent", optional=True),
                            base=f.name("base", optional=True), created_ns=f.integer("created_ns"),
                            generation=f.integer("generation"), definition=definition, disks=tuple(disks),
                            resume=f.offsets("resume"))
    sizes = {d.target: d.virtual_size for d in disks}
    for target, offset in header.resume.items():
        if target not in sizes or offset > sizes[target]:
            raise _fail(f"SNAPSHOT resume offset {offset} of disk {target} is not within a listed disk")
    return header


def _parse_verify(f: _Fields) -> VerifyRequest:
    return VerifyRequest(snapshots=tuple(_name("VERIFY", "snapshots", s) for s in f.items("snapshots", MAX_VERIFY)))


def _parse_verify_reply(f: _Fields) -> VerifyReply:
    raw = f._get("digests")
    if not isinstance(raw, dict) or len(raw) > MAX_VERIFY:
        raise _fail(f"VERIFY_REPLY digests is not an object of at most {MAX_VERIFY} snapshots")
    digests: dict[str, dict[str, str] | None] = {}
    for snap, disks in raw.items():
        snap = _name("VERIFY_REPLY", "snapshot", snap)
        if disks is None:
            digests[snap] = None
            continue
        if not isinstance(disks, dict) or len(disks) > MAX_DISKS:
            raise _fail(f"VERIFY_REPLY digests of {snap} is not an object of at most {MAX_DISKS} disks")
        digests[snap] = {_name("VERIFY_REPLY", "target", t): _hex("VERIFY_REPLY", t, h, CONTENT_DIGEST_HEX)
                         for t, h in disks.items()}
    return VerifyReply(digests=digests)


def _parse_blocks(f: _Fields) -> BlockDigestRequest:
    snapshot, disk = f.name("snapshot"), f.name("disk")
    block_size = f.integer("block_size", MAX_DATA)
    if block_size < 65536 or block_size & (block_size - 1):
        raise _fail(f"BLOCKS block_size {block_size} is not a power of 2 from 64 KiB to 4 MiB")
    blocks = tuple(f.items("blocks", MAX_BLOCKS))
    if any(type(b) is not int or not 0 <= b <= MAX_VIRTUAL_SIZE // block_size for b in blocks):
        raise _fail("BLOCKS blocks is not a list of block numbers within a disk")
    return BlockDigestRequest(snapshot=snapshot, disk=disk, block_size=block_size, blocks=blocks)


def _parse_blocks_reply(f: _Fields) -> BlockDigestReply:
    digests = tuple(None if d is None else _hex("BLOCKS_REPLY", "digests", d, BLOCK_DIGEST_HEX)
                    for d in f.items("digests", MAX_BLOCKS))
    return BlockDigestReply(digests=digests)


def _parse_error(f: _Fields) -> Error:
    message = f.string("message", MAX_ERROR)
    kind = f.string("kind", 64)
    return Error(message=_text("ERROR", "message", message), kind=kind)


def _parse_ok(f: _Fields) -> Ok:
    return Ok(snapshot=f.name("snapshot"))


def _parse_end(f: _Fields) -> End:
    return End()


def _encode_body(message: Message) -> dict:
    match message:
        case Hello():
            return {"version": message.version, "vm_uuid": message.vm_uuid, "vm_name": message.vm_name,
                    "since_generation": message.since_generation}
        case ReceiverHello():
            p = message.partial
            return {"version": message.version,
                    "snapshots": [{"id": s.id, "parent": s.parent, "created_ns": s.created_ns,
                                   "generation": s.generation} for s in message.snapshots],
                    "partial": None if p is None else {"snapshot": p.snapshot, "base": p.base, "disks": p.disks},
                    "pruned": list(message.pruned)}
        case SnapshotHeader():
            h = message
            return {"id": h.id, "name": h.name, "parent": h.parent, "base": h.base, "created_ns": h.created_ns,
                    "generation": h.generation, "definition": h.definition,
                    "disks": [{"target": d.target, "virtual_size": d.virtual_size, "cluster_size": d.cluster_size}
                              for d in h.disks],
                    "resume": h.resume}
        case Ok():
            return {"snapshot": message.snapshot}
        case Error():
            return {"message": message.message, "kind": message.kind}
        case VerifyRequest():
            return {"snapshots": list(message.snapshots)}
        case VerifyReply():
            return {"digests": message.digests}
        case BlockDigestRequest():
            return {"snapshot": message.snapshot, "disk": message.disk, "block_size": message.block_size,
                    "blocks": list(message.blocks)}
        case BlockDigestReply():
            return {"digests": list(message.digests)}
        case End():
            return {}
    raise TypeError(f"{type(message).__name__} is not a control message; use the writer's stream methods")


# Control frames: type -> (name, message class, body size limit, parser).
_CONTROL: dict[int, tuple[str, type, int, Any]] = {
    T_HELLO: ("HELLO", Hello, 64 << 10, _parse_hello),
    T_RECEIVER_HELLO: ("RECEIVER_HELLO", ReceiverHello, 32 << 20, _parse_receiver_hello),
    T_SNAPSHOT: ("SNAPSHOT", SnapshotHeader, 8 << 20, _parse_snapshot),
    T_OK: ("OK", Ok, 4 << 10, _parse_ok),
    T_ERROR: ("ERROR", Error, 16 << 10, _parse_error),
    T_VERIFY: ("VERIFY", VerifyRequest, 2 << 20, _parse_verify),
    T_VERIFY_REPLY: ("VERIFY_REPLY", VerifyReply, 32 << 20, _parse_verify_reply),
    T_BLOCKS: ("BLOCKS", BlockDigestRequest, 4 << 20, _parse_blocks),
    T_BLOCKS_REPLY: ("BLOCKS_REPLY", BlockDigestReply, 12 << 20, _parse_blocks_reply),
    T_END: ("END", End, 16, _parse_end),
}
_TYPE_OF = {cls: t for t, (_, cls, _, _) in _CONTROL.items()}
_NAMES = {t: name for t, (name, _, _, _) in _CONTROL.items()} | {
    T_DATA: "DATA", T_ZERO: "ZERO", T_DISK_END: "DISK_END", T_TRAILER: "TRAILER"}


# --- snapshot bookkeeping shared by writer and reader -------------------------------------------

class _SnapshotStream:
    """Order and digests of one snapshot's bulk frames: disks in header order, extents ascending
    and inside the disk. Both ends feed it the same records, so their digests agree."""

    def __init__(self, header: SnapshotHeader, body: bytes) -> None:
        self.header = header
        self.index = 0
        self.snapshot_hash = xxhash.xxh3_128(body)
        self._start_disk()

    def _start_disk(self) -> None:
        self.count = 0
        self.disk_hash = xxhash.xxh3_128()
        if self.index < len(self.header.disks):
            disk = self.header.disks[self.index]
            self.disk: DiskInfo | None = disk
            self.position = self.header.resume.get(disk.target, 0)
        else:
            self.disk = None

    def extent(self, kind: str, offset: int, length: int) -> DiskInfo:
        disk = self.disk
        if disk is None:
            raise _fail(f"{kind} at offset {offset} after the last disk of snapshot {self.header.id}")
        if length <= 0:
            raise _fail(f"{kind} at offset {offset} of disk {disk.target} has length 0")
        if offset < self.position:
            raise _fail(f"{kind} at offset {offset} of disk {disk.target} starts before {self.position} "
                        "(extents must ascend)")
        if offset + length > disk.virtual_size:
            raise _fail(f"{kind} at offset {offset} of disk {disk.target} ends past its size {disk.virtual_size}")
        self.position = offset + length
        self.count += 1
        return disk

    def record(self, rec: bytes) -> None:
        self.disk_hash.update(rec)
        self.snapshot_hash.update(rec)

    def end_disk(self) -> tuple[DiskInfo, bytes]:
        disk = self.disk
        if disk is None:
            raise _fail(f"DISK_END after the last disk of snapshot {self.header.id}")
        digest = self.disk_hash.digest()
        self.snapshot_hash.update(_DISK_END_HEAD.pack(T_DISK_END, self.count, digest))
        self.index += 1
        self._start_disk()
        return disk, digest

    def trailer(self) -> bytes:
        if self.disk is not None:
            raise _fail(f"TRAILER before DISK_END of disk {self.disk.target}")
        return self.snapshot_hash.digest()


# --- encoding -----------------------------------------------------------------------------------

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # ZstdCompressor objects are not safe to share between threads; callers may encode in a pool.
    c = getattr(_local, "compressor", None)
    if c is None:
        c = _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False)
    return c


@dataclass(frozen=True)
class EncodedData:
    """A DATA frame ready to write; `encode_data` is pure, so a thread pool can run it."""
    offset: int
    length: int
    head: bytes
    payload: bytes | memoryview
    checksum: bytes

    @property
    def wire_bytes(self) -> int:
        return len(self.head) + len(self.payload)


def encode_data(offset: int, data: bytes | bytearray | memoryview, *, compress: bool = True) -> EncodedData:
    """Checksum `data` and compress it with zstd when that saves at least MIN_SAVING."""
    view = memoryview(data).cast("B")
    length = len(view)
    if not 0 < length <= MAX_DATA:
        raise ValueError(f"DATA length {length} is not in 1..{MAX_DATA}")
    codec, payload = CODEC_RAW, view
    if compress:
        packed = _compressor().compress(view)
        if len(packed) <= length * (1 - MIN_SAVING):
            codec, payload = CODEC_ZSTD, packed
    head = _DATA_HEAD.pack(T_DATA, codec, offset, length, len(payload))
    h = xxhash.xxh3_128(head)
    h.update(view)
    checksum = h.digest()
    return EncodedData(offset, length, head + checksum, payload, checksum)


def _sanitized(message: Error) -> Error:
    """An ERROR as the reader accepts it, whatever text the failure carried: the frame that reports a
    failure must not fail itself."""
    line = " ".join(message.message.split())[:MAX_ERROR].encode(errors="replace").decode()
    line = "".join("?" if ord(c) < 32 or ord(c) == 127 else c for c in line)
    kind = message.kind if re.fullmatch("[A-Za-z]{1,64}", message.kind) else "VmreplError"
    return Error(message=line, kind=kind)


def _check64(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


class FrameWriter:
    """Writes one side's stream to a binary file object. Small frames are gathered in a buffer;
    large payloads go to the stream as they are (no copy). Control frames other than a snapshot
    header, and the trailer, flush: the peer answers them."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.bytes_written = 0
        # One buffer, reused: growing a fresh one for every write cost a third of the sender's time.
        self._buf = memoryview(bytearray(_BUFFER + _COPY_LIMIT))
        self._buf[:len(MAGIC)] = MAGIC
        self._fill = len(MAGIC)
        self._snapshot: _SnapshotStream | None = None

    def _put(self, data: bytes | memoryview) -> None:
        n = len(data)
        self.bytes_written += n
        if n > _COPY_LIMIT:
            self._drain()
            self.stream.write(data)
            return
        if self._fill + n > len(self._buf):
            self._drain()
        self._buf[self._fill:self._fill + n] = data
        self._fill += n
        if self._fill >= _BUFFER:
            self._drain()

    def _drain(self) -> None:
        if self._fill:
            self.stream.write(self._buf[:self._fill])
            self._fill = 0

    def flush(self) -> None:
        self._drain()
        flush = getattr(self.stream, "flush", None)
        if flush is not None:
            flush()

    def write(self, message: Message) -> None:
        """Write a control message: Hello, ReceiverHello, SnapshotHeader, Ok, Error, VerifyRequest,
        VerifyReply or End. A SnapshotHeader opens a snapshot: then `data`/`zero`/`end_disk` per disk
        and `trailer`."""
        if isinstance(message, Error):
            message = _sanitized(message)
        frame_type = _TYPE_OF.get(type(message))
        if frame_type is None:
            raise TypeError(f"{type(message).__name__} is not a control message; use data/zero/end_disk/trailer")
        if self._snapshot is not None and frame_type != T_ERROR:
            raise _fail(f"{_NAMES[frame_type]} inside snapshot {self._snapshot.header.id}; write its trailer first")
        body = json.dumps(_encode_body(message), separators=(",", ":"), ensure_ascii=False).encode()
        name, _, limit, parse = _CONTROL[frame_type]
        if len(body) > limit:
            raise _fail(f"{name} body of {len(body)} bytes exceeds the limit of {limit}")
        parse(_Fields(name, json.loads(body)))  # the writer never emits what the reader would refuse
        head = _JSON_HEAD.pack(frame_type, len(body))
        self._put(head + body + _CHECK64.pack(_check64(head + body)))
        if isinstance(message, SnapshotHeader):
            self._snapshot = _SnapshotStream(message, body)
        else:
            # Every other control frame is followed by waiting for the peer: let it see the frame.
            self._snapshot = None
            self.flush()

    def _stream(self) -> _SnapshotStream:
        if self._snapshot is None:
            raise _fail("extent outside a snapshot; write a SnapshotHeader first")
        return self._snapshot

    def data(self, offset: int, data: bytes | bytearray | memoryview, *, compress: bool = True) -> int:
        """Write `data` at `offset` of the current disk; returns the bytes it cost on the wire."""
        return self.write_encoded(encode_data(offset, data, compress=compress))

    def write_encoded(self, frame: EncodedData) -> int:
        snap = self._stream()
        snap.extent("DATA", frame.offset, frame.length)
        snap.record(frame.checksum)
        self._put(frame.head)
        self._put(frame.payload)
        return frame.wire_bytes

    def zero(self, offset: int, length: int) -> None:
        """Declare that `length` bytes at `offset` of the current disk read as zeros."""
        snap = self._stream()
        snap.extent("ZERO", offset, length)
        head = _ZERO_HEAD.pack(T_ZERO, offset, length)
        snap.record(head)
        self._put(head + _CHECK64.pack(_check64(head)))

    def end_disk(self) -> DiskEnd:
        snap = self._stream()
        count = snap.count
        disk, digest = snap.end_disk()
        head = _DISK_END_HEAD.pack(T_DISK_END, count, digest)
        self._put(head + _CHECK64.pack(_check64(head)))
        return DiskEnd(disk=disk.target, extents=count, digest=digest.hex())

    def trailer(self) -> Trailer:
        """Close the snapshot (after the last disk's end) and flush: the receiver answers next."""
        snap = self._stream()
        digest = snap.trailer()
        head = _TRAILER_HEAD.pack(T_TRAILER, digest)
        self._put(head + _CHECK64.pack(_check64(head)))
        self._snapshot = None
        self.flush()
        return Trailer(snapshot=snap.header.id, digest=digest.hex())


# --- parsing ------------------------------------------------------------------------------------

class FrameReader:
    """Parses the peer's stream from a binary file object, one message per `read()`; checks every
    checksum, limit and ordering rule and raises ProtocolError on the first violation. `peer`
    ("destination", "sender") prefixes the errors the peer reports in ERROR frames."""

    def __init__(self, stream: BinaryIO, *, peer: str = "peer") -> None:
        self.stream = stream
        self.peer = peer
        self.bytes_read = 0
        self._started = False
        self._hello_seen = False
        self._snapshot: _SnapshotStream | None = None
        self._after = "the start"
        self._dctx = zstandard.ZstdDecompressor()

    def _exact(self, n: int, what: str) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        readinto = getattr(self.stream, "readinto", None)
        while got < n:
            if readinto is not None:
                k = readinto(view[got:])
            else:
                chunk = self.stream.read(n - got)
                k = len(chunk) if chunk else 0
                view[got:got + k] = chunk or b""
            if not k:
                raise ProtocolError(f"stream ended early: {what}, after {self.bytes_read + got} bytes",
                                    hint="the connection dropped or the peer failed; see its error, then retry")
            got += k
        self.bytes_read += n
        return buf

    def read(self) -> Message:
        if not self._started:
            magic = bytes(self._exact(len(MAGIC), "before the stream's magic"))
            if magic != MAGIC:
                raise ProtocolError(f"not a vmrepl stream (magic {magic!r})",
                                    hint="if a shell startup file on the destination (e.g. ~/.bashrc) prints "
                                         "something, make it quiet for non-interactive logins; else check "
                                         "--remote-command")
            self._started = True
        snap = self._snapshot
        frame_type = self._exact(1, f"expecting a frame after {self._after}")[0]
        name = _NAMES.get(frame_type)
        if name is None:
            raise _fail(f"unknown frame type 0x{frame_type:02x} after {self._after}")
        if snap is not None and frame_type not in (T_DATA, T_ZERO, T_DISK_END, T_TRAILER, T_ERROR):
            raise _fail(f"{name} inside snapshot {snap.header.id}")
        if snap is None and frame_type in (T_DATA, T_ZERO, T_DISK_END, T_TRAILER):
            raise _fail(f"{name} outside a snapshot")
        if frame_type in (T_HELLO, T_RECEIVER_HELLO):
            if self._hello_seen:
                raise _fail(f"a second {name}")
            self._hello_seen = True
        elif not self._hello_seen and frame_type != T_ERROR:
            raise _fail(f"{name} before the hello")
        if frame_type == T_DATA:
            message: Message = self._read_data(snap)
        elif frame_type == T_ZERO:
            message = self._read_zero(snap)
        elif frame_type == T_DISK_END:
            message = self._read_disk_end(snap)
        elif frame_type == T_TRAILER:
            message = self._read_trailer(snap)
        else:
            message = self._read_control(frame_type, name)
        self._after = name if not isinstance(message, (Data, Zero)) else f"{name} at offset {message.offset}"
        return message

    def expect(self, kind: type[M]) -> M:
        """Read the next message, which must be a `kind`; an ERROR from the peer is raised as the
        error it names."""
        message = self.read()
        if isinstance(message, Error) and kind is not Error:
            raise message.exception(self.peer)
        if not isinstance(message, kind):
            raise _fail(f"expected {kind.__name__}, got {type(message).__name__}")
        return message

    def _read_fixed(self, st: struct.Struct, frame_type: int, what: str) -> tuple:
        rest = self._exact(st.size - 1, what)
        raw = bytes([frame_type]) + rest
        fields = st.unpack(raw)
        if _check64(raw[:-8]) != fields[-1]:
            raise _corrupt(f"checksum mismatch in {what}")
        return fields

    def _read_control(self, frame_type: int, name: str) -> Message:
        (length,) = struct.unpack(">I", self._exact(4, f"in {name} header"))
        _, _, limit, parse = _CONTROL[frame_type]
        if length > limit:
            raise _fail(f"{name} body of {length} bytes exceeds the limit of {limit}")
        body = bytes(self._exact(length + 8, f"in {name} body"))
        (check,) = _CHECK64.unpack_from(body, length)
        body = body[:length]
        if _check64(_JSON_HEAD.pack(frame_type, length) + body) != check:
            raise _corrupt(f"checksum mismatch in {name}")
        fields = _Fields(name, _decode_json(name, body))
        message = parse(fields)
        fields.done()
        if isinstance(message, SnapshotHeader):
            self._snapshot = _SnapshotStream(message, body)
        elif isinstance(message, Error):
            self._snapshot = None
        return message

    def _read_data(self, snap: _SnapshotStream) -> Data:
        disk = snap.disk.target if snap.disk else "?"
        head = self._exact(_DATA.size - 1, f"in DATA header of disk {disk}")
        _, codec, offset, length, payload_len, checksum = _DATA.unpack(bytes([T_DATA]) + head)
        where = f"DATA at offset {offset} of disk {disk}"
        if not 0 < length <= MAX_DATA:
            raise _fail(f"{where} has length {length} (limit {MAX_DATA})")
        if codec == CODEC_RAW:
            if payload_len != length:
                raise _fail(f"{where}: raw payload of {payload_len} bytes for length {length}")
        elif codec == CODEC_ZSTD:
            if not 0 < payload_len <= length:
                raise _fail(f"{where}: zstd payload of {payload_len} bytes for length {length}")
        else:
            raise _fail(f"{where} has unknown codec {codec}")
        payload = self._exact(payload_len, f"in {where}")
        if codec == CODEC_ZSTD:
            try:
                # The frame's own size field must match before anything is allocated for it.
                if zstandard.get_frame_parameters(payload).content_size != length:
                    raise _fail(f"{where}: zstd frame does not declare {length} bytes")
                data = self._dctx.decompress(payload, max_output_size=length, allow_extra_data=False)
            except zstandard.ZstdError:
                raise _corrupt(f"{where}: zstd payload does not decompress") from None
            if len(data) != length:
                raise _fail(f"{where}: zstd payload decompresses to {len(data)} bytes, not {length}")
        else:
            data = payload
        h = xxhash.xxh3_128(_DATA_HEAD.pack(T_DATA, codec, offset, length, payload_len))
        h.update(data)
        if h.digest() != checksum:
            raise _corrupt(f"checksum mismatch in {where}")
        snap.extent("DATA", offset, length)  # after the checksum: a damaged offset is damage in transit
        snap.record(checksum)
        return Data(disk=disk, offset=offset, data=data, wire_bytes=_DATA.size + payload_len)

    def _read_zero(self, snap: _SnapshotStream) -> Zero:
        disk = snap.disk.target if snap.disk else "?"
        _, offset, length, _ = self._read_fixed(_ZERO, T_ZERO, f"ZERO of disk {disk}")
        snap.extent("ZERO", offset, length)
        snap.record(_ZERO_HEAD.pack(T_ZERO, offset, length))
        return Zero(disk=disk, offset=offset, length=length)

    def _read_disk_end(self, snap: _SnapshotStream) -> DiskEnd:
        disk = snap.disk.target if snap.disk else "?"
        _, count, digest, _ = self._read_fixed(_DISK_END, T_DISK_END, f"DISK_END of disk {disk}")
        expected_count = snap.count
        _, expected = snap.end_disk()
        if count != expected_count:
            raise _corrupt(f"extent count mismatch at the end of disk {disk}: {count} announced, "
                           f"{expected_count} received")
        if digest != expected:
            raise _corrupt(f"digest mismatch at the end of disk {disk}: the {count} extents received "
                           "are not the ones sent")
        return DiskEnd(disk=disk, extents=count, digest=digest.hex())

    def _read_trailer(self, snap: _SnapshotStream) -> Trailer:
        _, digest, _ = self._read_fixed(_TRAILER, T_TRAILER, f"TRAILER of snapshot {snap.header.id}")
        if digest != snap.trailer():
            raise _corrupt(f"digest mismatch in the TRAILER of snapshot {snap.header.id}")
        self._snapshot = None
        return Trailer(snapshot=snap.header.id, digest=digest.hex())
