"""docs/FORMAT.md pinned to the code: its byte layouts, digests and every limit it names.

Each limit is checked at the value the page gives (accepted) and one past it (refused). The frames are
built here from the page's description (struct + xxhash), not with vmrepl.wire's own encoder, so a
change on either side shows. Pure: no VM, no ssh, no qemu.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct

import pytest
import xxhash
import zstandard

from vmrepl import wire
from vmrepl.errors import ProtocolError

VM = "6a1c1a55-2f7e-4c1b-9d7e-0f1e2d3c4b5a"

# FORMAT.md, "Frames": type letter and body limit of every control frame.
CONTROL = {
    "HELLO": (b"H", 64 << 10),
    "RECEIVER_HELLO": (b"h", 32 << 20),
    "SNAPSHOT": (b"S", 8 << 20),
    "OK": (b"K", 4 << 10),
    "ERROR": (b"E", 16 << 10),
    "VERIFY": (b"V", 2 << 20),
    "VERIFY_REPLY": (b"v", 32 << 20),
    "BLOCKS": (b"B", 4 << 20),
    "BLOCKS_REPLY": (b"b", 12 << 20),
    "END": (b"Q", 16),
}
BULK = {"DATA": b"D", "ZERO": b"Z", "DISK_END": b"d", "TRAILER": b"T"}

SMALLEST = {  # a valid body of each control frame
    "HELLO": {"version": 3, "vm_uuid": VM, "vm_name": "w", "since_generation": 0},
    "RECEIVER_HELLO": {"version": 3, "snapshots": [], "partial": None, "pruned": []},
    "SNAPSHOT": {"id": "s1", "name": "n", "parent": None, "base": None, "created_ns": 0, "generation": 0,
                 "definition": "", "disks": [], "resume": {}},
    "OK": {"snapshot": "s1"},
    "ERROR": {"message": "m", "kind": "VmreplError"},
    "VERIFY": {"snapshots": []},
    "VERIFY_REPLY": {"digests": {}},
    "BLOCKS": {"snapshot": "s1", "disk": "vda", "block_size": 65536, "blocks": []},
    "BLOCKS_REPLY": {"digests": []},
    "END": {},
}


def control(name: str, body: bytes | dict) -> bytes:
    """A control frame as FORMAT.md lays it out: type, u32 BE length, body, u64 BE xxh3_64 of all before."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    head = CONTROL[name][0] + struct.pack(">I", len(body))
    return head + body + xxhash.xxh3_64_digest(head + body)


HELLO = control("HELLO", SMALLEST["HELLO"])


def read(*frames: bytes, count: int | None = None) -> list[wire.Message]:
    """Read the frames (after the magic and, unless the first is a hello, a HELLO)."""
    lead = () if frames and frames[0][:1] in (b"H", b"h") else (HELLO,)
    raw = wire.MAGIC + b"".join(lead + frames)
    reader = wire.FrameReader(io.BytesIO(raw))
    n = len(lead) + len(frames) if count is None else count
    return [reader.read() for _ in range(n)][len(lead):]


def refused(*frames: bytes, match: str = "", count: int | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        read(*frames, count=count)
    return info.value


def snapshot_body(**change: object) -> dict:
    body = {**SMALLEST["SNAPSHOT"], "disks": [{"target": "vda", "virtual_size": 1 << 20, "cluster_size": 65536}]}
    return {**body, **change}


# --- bytes -----------------------------------------------------------------------------------------

def test_magic_and_type_letters() -> None:
    assert wire.MAGIC == bytes.fromhex("89564d5245504c0a") == b"\x89VMREPL\n"
    for name, (letter, limit) in CONTROL.items():
        assert wire._NAMES[letter[0]] == name and wire._CONTROL[letter[0]][2] == limit
    for name, letter in BULK.items():
        assert wire._NAMES[letter[0]] == name
    assert len(wire._NAMES) == len(CONTROL) + len(BULK)


def test_control_frame_bytes() -> None:
    out = io.BytesIO()
    w = wire.FrameWriter(out)
    w.write(wire.Hello(VM, "web", since_generation=5))
    w.write(wire.End())
    body = json.dumps({"version": 3, "vm_uuid": VM, "vm_name": "web", "since_generation": 5},
                      separators=(",", ":")).encode()
    hello = b"H" + len(body).to_bytes(4, "big") + body
    end = b"Q\x00\x00\x00\x02{}"
    assert out.getvalue() == (wire.MAGIC + hello + xxhash.xxh3_64(hello).digest()
                              + end + xxhash.xxh3_64_intdigest(end).to_bytes(8, "big"))


def test_data_frame_bytes_raw_and_zstd() -> None:
    noise = b"".join(xxhash.xxh3_128(i.to_bytes(2, "big")).digest() for i in range(256))  # incompressible
    frame = wire.encode_data(1 << 33, noise)
    head = b"D\x00" + (1 << 33).to_bytes(8, "big") + (4096).to_bytes(4, "big") + (4096).to_bytes(4, "big")
    assert frame.head == head + xxhash.xxh3_128(head + noise).digest() and len(frame.head) == 34
    assert bytes(frame.payload) == noise and frame.wire_bytes == 34 + 4096

    text = b"vmrepl " * 1000
    frame = wire.encode_data(0, text)
    p = len(frame.payload)
    head = b"D\x01" + bytes(8) + len(text).to_bytes(4, "big") + p.to_bytes(4, "big")
    assert frame.head == head + xxhash.xxh3_128(head + text).digest()
    assert p <= 0.9 * len(text)
    params = zstandard.get_frame_parameters(bytes(frame.payload))
    assert params.content_size == len(text) and not params.has_checksum and params.dict_id == 0
    assert zstandard.ZstdDecompressor().decompress(bytes(frame.payload)) == text


def test_zero_disk_end_trailer_bytes_and_digests() -> None:
    """The records, disk digests and snapshot digest computed as FORMAT.md defines them."""
    header = wire.SnapshotHeader(id="s1", name="n", parent=None, base=None, created_ns=1, generation=2,
                                 definition="<domain/>", disks=(wire.DiskInfo("vda", 1 << 20, 65536),
                                                                wire.DiskInfo("vdb", 1 << 20, 65536)))
    out = io.BytesIO()
    w = wire.FrameWriter(out)
    w.write(header)
    data = wire.encode_data(0, b"a" * 5000)
    w.write_encoded(data)
    w.zero(8192, 4096)
    end_a = w.end_disk()
    end_b = w.end_disk()
    trailer = w.trailer()
    raw = out.getvalue()
    # The SNAPSHOT body as "Frames" spells it: compact, keys in the listed order, disks as listed.
    body = (b'{"id":"s1","name":"n","parent":null,"base":null,"created_ns":1,"generation":2,'
            b'"definition":"<domain/>","disks":[{"target":"vda","virtual_size":1048576,"cluster_size":65536},'
            b'{"target":"vdb","virtual_size":1048576,"cluster_size":65536}],"resume":{}}')
    head = b"S" + len(body).to_bytes(4, "big")
    snapshot_frame = head + body + xxhash.xxh3_64_digest(head + body)
    assert raw[:len(wire.MAGIC) + len(snapshot_frame)] == wire.MAGIC + snapshot_frame
    stream = raw[len(wire.MAGIC) + len(snapshot_frame):]

    zero = b"Z" + (8192).to_bytes(8, "big") + (4096).to_bytes(8, "big")
    disk_a = xxhash.xxh3_128(data.checksum + zero).digest()
    end_head_a = b"d" + (2).to_bytes(8, "big") + disk_a
    disk_b = xxhash.xxh3_128(b"").digest()
    end_head_b = b"d" + bytes(8) + disk_b
    snap = xxhash.xxh3_128(body + data.checksum + zero + end_head_a + end_head_b).digest()
    tail = b"T" + snap
    assert stream == (data.head + bytes(data.payload)
                      + zero + xxhash.xxh3_64_digest(zero)
                      + end_head_a + xxhash.xxh3_64_digest(end_head_a)
                      + end_head_b + xxhash.xxh3_64_digest(end_head_b)
                      + tail + xxhash.xxh3_64_digest(tail))
    assert len(zero) + 8 == 25 and len(end_head_a) + 8 == 33 and len(tail) + 8 == 25
    assert (end_a.digest, end_b.digest, trailer.digest) == (disk_a.hex(), disk_b.hex(), snap.hex())


def test_block_digest_is_xxh3_128_hex() -> None:
    assert wire.block_digest(b"abc") == xxhash.xxh3_128(b"abc").digest().hex()
    assert len(wire.block_digest(b"")) == 32


def test_content_digest_definition() -> None:
    """FORMAT.md, "Verify": blake2b-256 (person vmrepl-digest-1) of the size, then per 4 MiB block that
    does not read as zeros its index and xxh3_128; a block reported zero is not even read."""
    import nbd

    from vmrepl.digest import handle_digest

    block = 4 << 20
    size = 3 * block + 5
    disk = bytearray(size)
    disk[10] = 1                      # block 0: data
    # block 1: allocated, reads as zeros (reported as data): contributes nothing
    disk[2 * block + 1] = 7           # block 2: reported as a hole below: never read, contributes nothing
    disk[3 * block + 4] = 9           # block 3: short (5 bytes)

    class FakeExport:
        def can_meta_context(self, context: str) -> bool:
            return context == "base:allocation"

        def get_size(self) -> int:
            return size

        def block_status(self, length: int, offset: int, callback) -> None:  # type: ignore[no-untyped-def]
            extents = [(0, 2 * block, 0), (2 * block, block, nbd.STATE_ZERO | nbd.STATE_HOLE), (3 * block, 5, 0)]
            entries = [v for start, n, flags in extents if start + n > offset for v in
                       (start + n - max(start, offset), flags)]
            callback("base:allocation", offset, entries, 0)

        def aio_pread(self, buf: bytearray, offset: int) -> int:
            assert not 2 * block <= offset < 3 * block, "a block reported zero was read"
            buf[:] = disk[offset:offset + len(buf)]
            return 1

        def aio_command_completed(self, cookie: int) -> bool:
            return True

    expected = hashlib.blake2b(digest_size=32, person=b"vmrepl-digest-1")
    expected.update(size.to_bytes(8, "little"))
    for index in (0, 3):
        expected.update(index.to_bytes(8, "little") + xxhash.xxh3_128(bytes(disk[index * block:][:block])).digest())
    assert handle_digest(FakeExport()) == expected.hexdigest()  # type: ignore[arg-type]


# --- limits: at the limit accepted, one past refused ------------------------------------------------

@pytest.mark.parametrize("name", list(CONTROL))
def test_body_limit(name: str) -> None:
    letter, limit = CONTROL[name]
    # n = limit passes the header check (the stream then ends in the body); n = limit + 1 is refused
    # on the header alone, before the body is read.
    refused(letter + struct.pack(">I", limit), match=f"^stream ended early: in {name} body")
    refused(letter + struct.pack(">I", limit + 1),
            match=f"^stream corrupt: {name} body of {limit + 1} bytes exceeds the limit of {limit}")
    if limit <= 4 << 20:  # and a whole body of exactly `limit` bytes is read (the 32 MiB ones cost 0.2 s)
        body = json.dumps(SMALLEST[name]).encode()
        padded = b" " * (limit - len(body)) + body  # JSON whitespace: still the same object
        assert len(read(control(name, padded))) == 1


def test_integers_up_to_2_63_minus_1() -> None:
    top = (1 << 63) - 1
    assert read(control("HELLO", {**SMALLEST["HELLO"], "since_generation": top}))[0].since_generation == top
    for bad in (1 << 63, -1, True, 1.0):
        refused(control("HELLO", {**SMALLEST["HELLO"], "since_generation": bad}), match="'since_generation'")


def test_text_limits() -> None:
    assert read(control("HELLO", {**SMALLEST["HELLO"], "vm_name": "é" * 256}))[0].vm_name == "é" * 256
    refused(control("HELLO", {**SMALLEST["HELLO"], "vm_name": "x" * 257}), match="at most 256")
    for c in ("\x00", "\x1f", "\x7f"):
        refused(control("HELLO", {**SMALLEST["HELLO"], "vm_name": f"a{c}b"}), match="control characters")
    assert read(control("ERROR", {"message": "m" * 1000, "kind": "K" * 64}))[0] == wire.Error("m" * 1000, "K" * 64)
    refused(control("ERROR", {"message": "m" * 1001, "kind": "K"}), match="'message'")
    refused(control("ERROR", {"message": "m", "kind": "K" * 65}), match="'kind'")
    refused(control("HELLO", {**SMALLEST["HELLO"], "vm_uuid": VM.upper()}), match="lowercase UUID")


def test_safe_names() -> None:
    def ok(name: str) -> wire.Message:
        return read(control("OK", {"snapshot": name}))[0]
    for good in ("a" * 128, "_x", "+x", "9", "a.b", "a:b-c+d_e"):
        assert ok(good) == wire.Ok(good)
    for bad in ("a" * 129, ".x", "-x", ":x", "a..b", "a/b", "", "é"):
        refused(control("OK", {"snapshot": bad}), match="not a safe name|not a string")


def test_version_is_named_before_other_fields() -> None:
    for name in ("HELLO", "RECEIVER_HELLO"):
        err = refused(control(name, {"version": 4}), match="^protocol version 4 is not supported "
                                                           r"\(this vmrepl speaks 3\)")
        assert not err.retryable


def test_receiver_hello_counts() -> None:
    ids = [f"s{i}" for i in range(100_000)]
    hello = {**SMALLEST["RECEIVER_HELLO"], "pruned": ids}
    assert len(read(control("RECEIVER_HELLO", hello))[0].pruned) == 100_000
    refused(control("RECEIVER_HELLO", {**hello, "pruned": [*ids, "x"]}), match="at most 100000")
    refused(control("RECEIVER_HELLO", {**hello, "pruned": [], "snapshots": [None] * 100_001}), match="at most 100000")
    disks = {f"vd{i}": 1 << 60 for i in range(64)}
    partial = {"snapshot": "s1", "base": None, "disks": disks}
    assert read(control("RECEIVER_HELLO", {**SMALLEST["RECEIVER_HELLO"], "partial": partial}))[0].partial.disks == disks
    refused(control("RECEIVER_HELLO", {**SMALLEST["RECEIVER_HELLO"], "partial": {**partial, "disks": {"vda": (1 << 60) + 1}}}),
            match="'offset'")
    refused(control("RECEIVER_HELLO", {**SMALLEST["RECEIVER_HELLO"], "partial": {**partial, "disks": {**disks, "x": 0}}}),
            match="at most 64")


def test_snapshot_limits() -> None:
    def disk(i: int = 0, size: int = 1 << 20, cluster: int = 65536) -> dict:
        return {"target": f"vd{i}", "virtual_size": size, "cluster_size": cluster}
    assert len(read(control("SNAPSHOT", snapshot_body(disks=[disk(i) for i in range(64)])))[0].disks) == 64
    for good in (disk(size=1 << 60), disk(size=0), disk(cluster=512), disk(cluster=2 << 20)):
        read(control("SNAPSHOT", snapshot_body(disks=[good])))
    for bad, match in ((disk(size=(1 << 60) + 1), "'virtual_size'"), (disk(cluster=256), "power of 2"),
                       (disk(cluster=4 << 20), "'cluster_size'"), (disk(cluster=3 << 10), "power of 2")):
        refused(control("SNAPSHOT", snapshot_body(disks=[bad])), match=match)
    refused(control("SNAPSHOT", snapshot_body(disks=[disk(), disk()])), match="lists a disk twice")
    mib = 1 << 20
    assert len(read(control("SNAPSHOT", snapshot_body(definition="x" * mib)))[0].definition) == mib
    refused(control("SNAPSHOT", snapshot_body(definition="é" * (mib // 2 + 1))), match=f"longer than {mib} bytes")
    assert read(control("SNAPSHOT", snapshot_body(resume={"vd0": 1 << 20}, disks=[disk()])))[0].resume == {"vd0": mib}
    refused(control("SNAPSHOT", snapshot_body(resume={"vd0": mib + 1}, disks=[disk()])), match="not within a listed disk")


def test_verify_limits() -> None:
    ids = [f"s{i}" for i in range(10_000)]
    assert len(read(control("VERIFY", {"snapshots": ids}))[0].snapshots) == 10_000
    refused(control("VERIFY", {"snapshots": [*ids, "x"]}), match="at most 10000")
    digests = {i: None for i in ids}
    assert len(read(control("VERIFY_REPLY", {"digests": digests}))[0].digests) == 10_000
    refused(control("VERIFY_REPLY", {"digests": {**digests, "x": None}}), match="at most 10000")
    disks = {f"vd{i}": "0" * 64 for i in range(64)}
    assert read(control("VERIFY_REPLY", {"digests": {"s1": disks}}))[0].digests == {"s1": disks}
    refused(control("VERIFY_REPLY", {"digests": {"s1": {**disks, "x": "0" * 64}}}), match="at most 64")
    refused(control("VERIFY_REPLY", {"digests": {"s1": {"vda": "A" * 64}}}), match="64 hex")


def test_blocks_limits() -> None:
    def blocks(size: int, numbers: list[int]) -> bytes:
        return control("BLOCKS", {**SMALLEST["BLOCKS"], "block_size": size, "blocks": numbers})
    for size in (64 << 10, 1 << 20, 4 << 20):
        assert read(blocks(size, [0, (1 << 60) // size]))[0].blocks == (0, (1 << 60) // size)
        refused(blocks(size, [(1 << 60) // size + 1]), match="within a disk")
    for size in (32 << 10, 3 << 20, 8 << 20):
        refused(blocks(size, []), match="block_size")
    refused(blocks(1 << 20, [True]), match="within a disk")
    assert len(read(blocks(1 << 20, [0] * 262_144))[0].blocks) == 262_144
    refused(blocks(1 << 20, [0] * 262_145), match="at most 262144")
    assert len(read(control("BLOCKS_REPLY", {"digests": [None] * 262_144}))[0].digests) == 262_144
    refused(control("BLOCKS_REPLY", {"digests": [None] * 262_145}), match="at most 262144")


def data_frame(codec: int, offset: int, length: int, payload: bytes, content: bytes) -> bytes:
    head = b"D" + bytes([codec]) + struct.pack(">QII", offset, length, len(payload))
    return head + xxhash.xxh3_128(head + content).digest() + payload


def test_data_limits() -> None:
    snap = control("SNAPSHOT", snapshot_body(disks=[{"target": "vda", "virtual_size": 8 << 20, "cluster_size": 65536}]))
    full = bytes(range(256)) * (4 << 12)
    assert len(full) == 4 << 20
    assert len(read(snap, data_frame(0, 0, len(full), full, full))[1].data) == 4 << 20
    packed = zstandard.ZstdCompressor(level=1).compress(full)
    assert bytes(read(snap, data_frame(1, 1 << 20, len(full), packed, full))[1].data) == full
    refused(snap, data_frame(0, 0, 0, b"", b""), match="has length 0")
    refused(snap, data_frame(0, 0, 10, b"x" * 9, b"x" * 10), match="raw payload of 9 bytes for length 10")
    refused(snap, data_frame(1, 0, 10, b"", b"x" * 10), match="zstd payload of 0 bytes")
    refused(snap, data_frame(0, (8 << 20) - 9, 10, b"x" * 10, b"x" * 10), match="ends past its size")
    refused(snap, data_frame(2, 0, 10, b"x" * 10, b"x" * 10), match="unknown codec 2")
    text = b"y" * 4096
    nosize = zstandard.ZstdCompressor(write_content_size=False).compress(text)
    refused(snap, data_frame(1, 0, 4096, nosize, text), match="does not declare 4096 bytes")
    trailing = zstandard.ZstdCompressor().compress(text) + b"\0"
    refused(snap, data_frame(1, 0, 4096, trailing, text), match="does not decompress")
    # A zstd content checksum is not written, but a frame that has one is read (and checked).
    checked = zstandard.ZstdCompressor(write_checksum=True).compress(text)
    assert bytes(read(snap, data_frame(1, 0, 4096, checked, text))[1].data) == text


def test_zero_length_must_be_at_least_1() -> None:
    snap = control("SNAPSHOT", snapshot_body())
    def zero(offset: int, length: int) -> bytes:
        head = b"Z" + struct.pack(">QQ", offset, length)
        return head + xxhash.xxh3_64_digest(head)
    assert read(snap, zero(0, 1 << 20))[1] == wire.Zero("vda", 0, 1 << 20)
    refused(snap, zero(0, 0), match="has length 0")
    refused(snap, zero(1, 1 << 20), match="ends past its size")


def test_error_writer_sanitizes() -> None:
    out = io.BytesIO()
    w = wire.FrameWriter(out)
    w.write(wire.Error("  a \t\n b\x1b" + "c" * 2000, kind="Not-A-Class"))
    got = wire.FrameReader(io.BytesIO(out.getvalue())).read()
    assert got.kind == "VmreplError" and got.message.startswith("a b?ccc") and len(got.message) == 1000


# --- where the code once contradicted the spec (fixed since; these keep it so) ----------------------

def test_damaged_data_offset_is_a_retryable_checksum_mismatch() -> None:
    """FORMAT.md: the DATA checksum covers the frame's header, so a flipped offset is caught as a
    checksum mismatch, retryable (damage in transit). The reader used to judge the offset first."""
    snap = control("SNAPSHOT", snapshot_body())
    frame = bytearray(data_frame(0, 0, 4096, b"q" * 4096, b"q" * 4096))
    frame[2] ^= 0x80                                # the offset's top bit: now far past the disk's end
    err = refused(snap, bytes(frame), match="checksum mismatch")
    assert err.retryable


def test_verify_reply_is_null_for_a_snapshot_pruned_here(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """FORMAT.md: VERIFY_REPLY gives null for a snapshot the receiver does not hold. For a ghost row
    (pruned here) the receiver used to answer {} (and for a source-side ghost, whose layers rows name
    the layer below it, it would have digested that layer)."""
    from vmrepl.catalog import Catalog, Layer, Snapshot
    from vmrepl.sink.receive import _Session
    from vmrepl.sink.store import Store

    with Catalog(tmp_path) as catalog:
        snap = Snapshot(id="s1", vm_uuid=VM, vm_name="web", name="n1", parent=None, created_ns=1, generation=1,
                        origin="received", disks=(Layer("vda", str(tmp_path / "s1.qcow2"), 1 << 20),))
        catalog.add_snapshot(snap)
        catalog.forget(snap)
        session = _Session.__new__(_Session)
        session.store = Store(tmp_path, catalog)
        assert session._digests("s1") is None


def test_a_zero_range_of_any_size_is_one_zero_frame() -> None:
    """FORMAT.md: a zero range of any size costs one 25-byte ZERO frame. The sender used to cut zero
    ranges into 4 MiB pieces like data (replicate.py, `split` in `_stream_disk`): 256 frames for 1 GiB."""
    import contextlib
    import types

    from vmrepl import replicate
    from vmrepl.extents import Extent
    from vmrepl.source.changes import DiskChanges

    size = 1 << 30

    class Daemon:
        @contextlib.contextmanager
        def reader(self, image: str):  # type: ignore[no-untyped-def]
            yield types.SimpleNamespace(nbd=None)  # nothing is read for a zero range

    out = io.BytesIO()
    session = replicate.Session.__new__(replicate.Session)
    session.writer = wire.FrameWriter(out)
    session.writer.write(wire.SnapshotHeader(id="s1", name="n", parent=None, base=None, created_ns=0, generation=0,
                                             definition="", disks=(wire.DiskInfo("vda", size, 65536),)))
    changes = DiskChanges("vda", "image", size, None, [Extent(0, size, True)])
    session._stream_disk(Daemon(), None, changes, 0, replicate._NoBar())  # type: ignore[arg-type]
    session.writer.flush()
    reader = wire.FrameReader(io.BytesIO(wire.MAGIC + HELLO + out.getvalue()[len(wire.MAGIC):]))
    frames = [reader.read() for _ in range(2)]
    while not isinstance(frames[-1], wire.DiskEnd):
        frames.append(reader.read())
    assert [f for f in frames if isinstance(f, wire.Zero)] == [wire.Zero("vda", 0, size)]
