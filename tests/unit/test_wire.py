"""The wire stream: round trips, truncation, corruption, limits and overhead."""

from __future__ import annotations

import io
import json
import os
import struct

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from vmrepl import errors, wire
from vmrepl.errors import ProtocolError
from vmrepl.wire import (MAGIC, Data, DiskEnd, DiskInfo, End, Error, FrameReader, FrameWriter, HeldSnapshot, Hello,
                         Ok, Partial, ReceiverHello, SnapshotHeader, Trailer, VerifyReply, VerifyRequest, Zero)

VM = "6a1c1a55-2f7e-4c1b-9d7e-0f1e2d3c4b5a"
HEADER = SnapshotHeader(
    id="0b7f8a9e-1111-4222-8333-944455556666", name="nightly-1", parent="0b7f8a9e-0000-4222-8333-944455556666",
    base=None, created_ns=1_700_000_000_123_456_789, generation=7,
    definition="<domain type='kvm'><name>web</name></domain>",
    disks=(DiskInfo("vda", 1 << 30, 65536), DiskInfo("vdb", 8 << 20, 65536)),
)
TEXT = b"vmrepl compresses this nicely. " * 2048          # 64 KiB, compressible
NOISE = os.urandom(4096)                                 # incompressible


def sender_stream(header: SnapshotHeader = HEADER) -> bytes:
    out = io.BytesIO()
    w = FrameWriter(out)
    w.write(Hello(vm_uuid=VM, vm_name="web 1", since_generation=7))
    w.write(header)
    w.data(0, TEXT)
    w.zero(1 << 20, 3 << 20)
    w.data(5 << 20, NOISE)
    w.end_disk()
    w.data(4096, NOISE[:512])
    w.end_disk()
    w.trailer()
    w.write(VerifyRequest(snapshots=(header.id,)))
    w.write(End())
    w.flush()
    return out.getvalue()


def read_all(raw: bytes) -> list[wire.Message]:
    r = FrameReader(io.BytesIO(raw))
    messages = []
    while not messages or not isinstance(messages[-1], End):
        messages.append(r.read())
    return messages


def control_frame(frame_type: int, body: bytes) -> bytes:
    """A well-checksummed control frame around an arbitrary body, to reach the checks behind it."""
    head = struct.pack(">BI", frame_type, len(body))
    return head + body + struct.pack(">Q", xxhash.xxh3_64_intdigest(head + body))


def hello_frame() -> bytes:
    return control_frame(wire.T_HELLO, json.dumps({"version": wire.PROTOCOL_VERSION, "vm_uuid": VM, "vm_name": "web",
                                                   "since_generation": 0}).encode())


def refuse(raw: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        read_all(raw)


def test_sender_stream_round_trips() -> None:
    messages = read_all(sender_stream())
    kinds = [type(m) for m in messages]
    assert kinds == [Hello, SnapshotHeader, Data, Zero, Data, DiskEnd, Data, DiskEnd, Trailer, VerifyRequest, End]
    assert messages[0] == Hello(vm_uuid=VM, vm_name="web 1", since_generation=7)
    assert messages[1] == HEADER
    assert (messages[2].disk, messages[2].offset, bytes(messages[2].data)) == ("vda", 0, TEXT)
    assert messages[2].wire_bytes < len(TEXT) // 10           # compressed
    assert messages[3] == Zero(disk="vda", offset=1 << 20, length=3 << 20)
    assert (messages[4].offset, bytes(messages[4].data)) == (5 << 20, NOISE)
    assert messages[5].disk == "vda" and messages[5].extents == 3
    assert (messages[6].disk, bytes(messages[6].data)) == ("vdb", NOISE[:512])
    assert messages[8].snapshot == HEADER.id and len(messages[8].digest) == 32


def test_writer_and_reader_agree_on_digests() -> None:
    out = io.BytesIO()
    w = FrameWriter(out)
    w.write(Hello(vm_uuid=VM, vm_name="web"))
    w.write(HEADER)
    w.data(0, TEXT)
    ends = [w.end_disk(), w.end_disk()]
    trailer = w.trailer()
    got = read_all(out.getvalue() + control_frame(wire.T_END, b"{}"))
    assert [m for m in got if isinstance(m, DiskEnd)] == ends
    assert [m for m in got if isinstance(m, Trailer)] == [trailer]


def test_receiver_messages_round_trip() -> None:
    messages = [
        ReceiverHello(snapshots=(HeldSnapshot("a1", None, 5, 1), HeldSnapshot("a2", "a1", 9, 2)),
                      partial=Partial(snapshot="a3", base="a2", disks={"vda": 1 << 20, "vdb": 0}), pruned=("a0",)),
        Ok(snapshot="a3"),
        VerifyReply(digests={"a1": {"vda": "00ff" * 16}, "a9": None}),
        Error(message="no space left on device", kind="NoSpaceError"),
    ]
    out = io.BytesIO()
    w = FrameWriter(out)
    for m in messages:
        w.write(m)
    w.flush()
    r = FrameReader(io.BytesIO(out.getvalue()))
    assert [r.read() for _ in messages] == messages
    assert FrameReader(io.BytesIO(out.getvalue())).expect(ReceiverHello) == messages[0]
    empty = io.BytesIO()
    FrameWriter(empty).write(ReceiverHello())
    assert FrameReader(io.BytesIO(empty.getvalue())).read() == ReceiverHello()


def test_resume_starts_each_disk_at_its_offset() -> None:
    header = SnapshotHeader(**{**HEADER.__dict__, "resume": {"vda": 4 << 20}})
    out = io.BytesIO()
    w = FrameWriter(out)
    w.write(Hello(vm_uuid=VM, vm_name="web"))
    w.write(header)
    with pytest.raises(ProtocolError, match="starts before 4194304"):
        w.data(0, TEXT)
    w.data(5 << 20, NOISE)
    w.end_disk()
    w.end_disk()
    w.trailer()
    w.write(End())
    w.flush()
    messages = read_all(out.getvalue())
    assert messages[1].resume == {"vda": 4 << 20}


def test_error_frame_is_raised_as_its_class_by_expect() -> None:
    out = io.BytesIO()
    FrameWriter(out).write(Error.from_exception(errors.NoSpaceError("no space left on /var/lib/vmrepl")))
    reader = FrameReader(io.BytesIO(out.getvalue()), peer="destination")
    with pytest.raises(errors.NoSpaceError, match="^destination: no space left on /var/lib/vmrepl$") as info:
        reader.expect(ReceiverHello)
    assert info.value.retryable


def test_error_line_is_one_line_and_bounded() -> None:
    out = io.BytesIO()
    FrameWriter(out).write(Error(message="first\nsecond " + "x" * 5000))
    got = FrameReader(io.BytesIO(out.getvalue())).read()
    assert got.message.startswith("first second x") and len(got.message) == wire.MAX_ERROR


def test_every_truncation_is_reported_as_ended_early() -> None:
    raw = sender_stream()
    for cut in range(len(raw)):
        with pytest.raises(ProtocolError, match="^stream ended early"):
            read_all(raw[:cut])


def test_every_flipped_byte_is_detected() -> None:
    small = SnapshotHeader(**{**HEADER.__dict__, "disks": HEADER.disks[:1], "definition": "<domain/>"})
    out = io.BytesIO()
    w = FrameWriter(out)
    w.write(Hello(vm_uuid=VM, vm_name="web"))
    w.write(small)
    w.data(0, b"abc" * 300)        # zstd
    w.data(4096, NOISE[:700])      # raw
    w.zero(8192, 4096)
    w.end_disk()
    w.trailer()
    w.write(End())
    w.flush()
    raw = out.getvalue()
    read_all(raw)
    for pos in range(len(raw)):
        for mask in (0x01, 0x80):
            bad = bytearray(raw)
            bad[pos] ^= mask
            with pytest.raises(ProtocolError):
                read_all(bytes(bad))


def test_checksum_mismatch_names_offset_and_disk() -> None:
    raw = bytearray(sender_stream())
    raw[raw.index(NOISE) + 100] ^= 0x40
    refuse(bytes(raw), f"^stream corrupt: checksum mismatch in DATA at offset {5 << 20} of disk vda")


def test_bad_magic_and_version_are_refused() -> None:
    refuse(b"SSH-2.0-OpenSSH_9.2\r\n" + b"\0" * 64, "not a vmrepl stream")
    newer = wire.PROTOCOL_VERSION + 1
    frame = control_frame(wire.T_HELLO, json.dumps({"version": newer, "vm_uuid": VM, "vm_name": "w"}).encode())
    refuse(MAGIC + frame, f"protocol version {newer} is not supported")


def test_order_rules() -> None:
    refuse(MAGIC + control_frame(wire.T_END, b"{}"), "END before the hello")
    refuse(MAGIC + hello_frame() + hello_frame(), "a second HELLO")
    frame = wire.encode_data(0, b"x" * 100)
    refuse(MAGIC + hello_frame() + frame.head + bytes(frame.payload), "DATA outside a snapshot")


def test_extents_must_ascend_and_fit_the_disk() -> None:
    out = io.BytesIO()
    w = FrameWriter(out)
    w.write(Hello(vm_uuid=VM, vm_name="web"))
    w.write(HEADER)
    w.data(1 << 20, NOISE)
    with pytest.raises(ProtocolError, match="must ascend"):
        w.data(0, NOISE)
    with pytest.raises(ProtocolError, match="ends past its size"):
        w.zero((1 << 30) - 4096, 8192)
    w.end_disk()
    w.end_disk()
    with pytest.raises(ProtocolError, match="after the last disk"):
        w.zero(0, 4096)
    with pytest.raises(ProtocolError, match="inside snapshot"):
        w.write(End())


def test_unsafe_names_are_refused() -> None:
    for bad in ("../etc", "a/b", "/abs", ".hidden", ""):
        with pytest.raises(ProtocolError, match="not a safe name"):
            FrameWriter(io.BytesIO()).write(SnapshotHeader(**{**HEADER.__dict__, "name": bad}))
        for held, pruned in (([{"id": bad, "parent": None, "created_ns": 1, "generation": 1}], []), ([], [bad])):
            body = json.dumps({"version": wire.PROTOCOL_VERSION, "snapshots": held, "partial": None,
                               "pruned": pruned}).encode()
            refuse(MAGIC + control_frame(wire.T_RECEIVER_HELLO, body), "not a safe name")


def test_strict_json() -> None:
    def body(text: str) -> bytes:
        return MAGIC + control_frame(wire.T_HELLO, text.encode())
    v = wire.PROTOCOL_VERSION
    refuse(body(f'{{"version":{v},"vm_uuid":"{VM}","vm_name":"a","since_generation":0,"x":1}}'), "unknown field 'x'")
    refuse(body(f'{{"version":{v},"version":{v},"vm_uuid":"{VM}","vm_name":"a"}}'), "not valid JSON")
    refuse(body(f'{{"version":true,"vm_uuid":"{VM}","vm_name":"a"}}'), "'version' is not an integer")
    refuse(body(f'{{"version":{v},"vm_uuid":"not-a-uuid","vm_name":"a"}}'), "not a lowercase UUID")
    refuse(body(f'{{"version":{v},"vm_uuid":"{VM}","vm_name":"a\\nb"}}'), "control characters")
    refuse(body(f'{{"version":{v},"vm_uuid":"{VM}","vm_name":"a","since_generation":-1}}'), "'since_generation' is not")
    # An older peer's hello lacks fields of this version: the version is what gets named.
    refuse(body(f'{{"version":2,"vm_uuid":"{VM}","vm_name":"a"}}'), "protocol version 2 is not supported")
    refuse(body("[1]"), "not an object")


def test_oversize_lengths_are_refused() -> None:
    refuse(MAGIC + struct.pack(">BI", wire.T_HELLO, 1 << 30), "exceeds the limit")
    header = json.loads(json.dumps(wire._encode_body(HEADER)))
    for change, match in [
        ({"definition": "x" * (wire.MAX_DEFINITION + 1)}, "not a string of at most"),
        ({"disks": [{"target": f"vd{i}", "virtual_size": 1 << 20, "cluster_size": 65536} for i in range(65)]},
         "not a list of at most 64"),
        ({"disks": [{"target": "vda", "virtual_size": 1 << 61, "cluster_size": 65536}]}, "'virtual_size'"),
        ({"disks": [{"target": "vda", "virtual_size": 1 << 20, "cluster_size": 3000}]}, "power of 2"),
        ({"resume": {"vdz": 0}}, "not within a listed disk"),
    ]:
        frame = control_frame(wire.T_SNAPSHOT, json.dumps({**header, **change}).encode())
        refuse(MAGIC + hello_frame() + frame, match)
    snapshot = control_frame(wire.T_SNAPSHOT, json.dumps(header).encode())
    too_long = struct.pack(">BBQII16s", wire.T_DATA, wire.CODEC_RAW, 0, wire.MAX_DATA + 1, wire.MAX_DATA + 1, b"\0" * 16)
    refuse(MAGIC + hello_frame() + snapshot + too_long, "has length 4194305")
    bomb = struct.pack(">BBQII16s", wire.T_DATA, wire.CODEC_ZSTD, 0, 4096, 8192, b"\0" * 16)
    refuse(MAGIC + hello_frame() + snapshot + bomb, "zstd payload of 8192 bytes for length 4096")
    with pytest.raises(ValueError):
        wire.encode_data(0, bytes(wire.MAX_DATA + 1))


def test_incompressible_frame_costs_under_64_bytes() -> None:
    data = os.urandom(wire.MAX_DATA)
    out = io.BytesIO()
    w = FrameWriter(out)
    w.write(HEADER)
    before = w.bytes_written
    assert w.data(0, data) == w.bytes_written - before
    assert w.bytes_written - before - len(data) < 64


def test_zero_ranges_cost_a_fixed_few_bytes() -> None:
    w = FrameWriter(io.BytesIO())
    w.write(HEADER)
    before = w.bytes_written
    w.zero(0, 1 << 30)
    assert w.bytes_written - before == 25


def test_compressible_data_is_compressed_and_reads_back() -> None:
    data = bytes(range(256)) * (wire.MAX_DATA // 256)
    frame = wire.encode_data(3 << 20, data)
    assert frame.head[1] == wire.CODEC_ZSTD and frame.wire_bytes < len(data) // 20
    out = io.BytesIO()  # a reader takes DATA only inside a snapshot, after the hello
    w = FrameWriter(out)
    w.write(Hello(vm_uuid=VM, vm_name="web"))
    w.write(HEADER)
    w.write_encoded(frame)
    w.flush()
    r = FrameReader(io.BytesIO(out.getvalue()))
    assert [type(r.read()) for _ in range(2)] == [Hello, SnapshotHeader]
    got = r.read()
    assert (got.disk, got.offset, got.wire_bytes) == ("vda", 3 << 20, frame.wire_bytes)
    assert bytes(got.data) == data


extents = st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.binary(min_size=1, max_size=3000)), max_size=8)


@settings(max_examples=60, deadline=None)
@given(disks=st.lists(extents, min_size=0, max_size=3), name=st.text(min_size=1, max_size=40))
def test_round_trip_property(disks: list, name: str) -> None:
    header = SnapshotHeader(**{**HEADER.__dict__, "disks": tuple(DiskInfo(f"vd{chr(97 + i)}", 1 << 24, 512)
                                                                    for i in range(len(disks)))})
    out = io.BytesIO()
    w = FrameWriter(out)
    vm_name = "".join(c for c in name if c.isprintable()) or "x"
    w.write(Hello(vm_uuid=VM, vm_name=vm_name))
    w.write(header)
    sent = []
    for i, disk in enumerate(disks):
        offset = 0
        for gap, is_zero, payload in disk:
            offset += gap * 512
            if is_zero:
                w.zero(offset, len(payload))
                sent.append(Zero(header.disks[i].target, offset, len(payload)))
            else:
                w.data(offset, payload)
                sent.append((header.disks[i].target, offset, payload))
            offset += len(payload)
        w.end_disk()
    w.trailer()
    w.write(End())
    w.flush()
    got = read_all(out.getvalue())
    assert got[0].vm_name == vm_name
    received = [m if isinstance(m, Zero) else (m.disk, m.offset, bytes(m.data))
                for m in got if isinstance(m, (Data, Zero))]
    assert received == sent


def test_block_digest_exchange_round_trips_and_is_strict() -> None:
    out = io.BytesIO()
    w = wire.FrameWriter(out)
    w.write(wire.Hello("0b6c3a37-5f0e-4f57-9c52-33c3a2b3d6a1", "vm"))
    request = wire.BlockDigestRequest("s1", "vda", 1 << 20, (0, 3, 9))
    reply = wire.BlockDigestReply((wire.block_digest(b"abc"), None, wire.block_digest(bytes(10))))
    w.write(request)
    w.write(reply)
    r = wire.FrameReader(io.BytesIO(out.getvalue()))
    r.read()
    assert r.read() == request and r.read() == reply
    for bad in (wire.BlockDigestRequest("s1", "vda", 3 << 20, (0,)), wire.BlockDigestRequest("../x", "vda", 1 << 20, ()),
                wire.BlockDigestRequest("s1", "vda", 1 << 20, (-1,))):
        with pytest.raises(errors.ProtocolError):
            wire.FrameWriter(io.BytesIO()).write(bad)  # the writer refuses what the reader would refuse


def test_digests_have_their_exact_length() -> None:
    def reply(frame_type: int, body: dict) -> bytes:
        return MAGIC + hello_frame() + control_frame(frame_type, json.dumps(body).encode())
    for digest in ("0" * 31, "0" * 33, "0" * 64, "0" * 128):
        refuse(reply(wire.T_BLOCKS_REPLY, {"digests": [digest]}), "not a digest of 32 hex characters")
    for digest in ("0" * 32, "0" * 63, "0" * 128):
        refuse(reply(wire.T_VERIFY_REPLY, {"digests": {"a1": {"vda": digest}}}), "not a digest of 64 hex characters")


@pytest.mark.parametrize("frame_type", [wire.T_HELLO, wire.T_SNAPSHOT, wire.T_ERROR, wire.T_OK, wire.T_VERIFY], ids=chr)
def test_deep_nesting_is_refused(frame_type: int) -> None:
    before = b"" if frame_type == wire.T_HELLO else hello_frame()
    refuse(MAGIC + before + control_frame(frame_type, b"[" * 2000 + b"]" * 2000), "body nests too deeply")


def test_lone_surrogates_are_refused() -> None:
    snapshot = {**json.loads(json.dumps(wire._encode_body(HEADER))), "definition": "\ud800"}
    refuse(MAGIC + hello_frame() + control_frame(wire.T_SNAPSHOT, json.dumps(snapshot).encode()), "lone surrogate")
    hello = f'{{"version":{wire.PROTOCOL_VERSION},"vm_uuid":"{VM}","vm_name":"a\\udfff","since_generation":0}}'
    refuse(MAGIC + control_frame(wire.T_HELLO, hello.encode()), "lone surrogate")


def test_error_frame_carries_any_failure_text() -> None:
    out = io.BytesIO()
    FrameWriter(out).write(Error(message="bad \x1b[31mname\x00 \ud800 here", kind="Not a class!"))
    got = FrameReader(io.BytesIO(out.getvalue())).read()
    assert got == Error(message="bad ?[31mname? ? here", kind="VmreplError")


def test_untrusted_text_in_errors_is_bounded() -> None:
    v = wire.PROTOCOL_VERSION
    for body in (f'{{"version":{v},"vm_uuid":"{VM}","vm_name":"a","since_generation":0,"{"k" * 60000}":1}}',
                 f'{{"version":{v},"vm_uuid":"{VM}","vm_name":"a","since_generation":0,"x":{"1" * 60000}}}'):
        with pytest.raises(ProtocolError) as info:
            read_all(MAGIC + control_frame(wire.T_HELLO, body.encode()))
        assert len(str(info.value)) < 300, str(info.value)[:400]


def test_messages_say_what_to_do() -> None:
    with pytest.raises(ProtocolError, match=r"^not a vmrepl stream \(magic b'Welcome!'\); .*~/.bashrc") as info:
        read_all(b"Welcome!\n" + sender_stream())
    assert not info.value.retryable
    raw = bytearray(sender_stream())
    raw[raw.index(NOISE) + 100] ^= 0x40
    with pytest.raises(ProtocolError, match="damaged in transit or in memory; retry") as info:
        read_all(bytes(raw))
    assert info.value.retryable


def test_disk_end_says_what_differed() -> None:
    raw = bytearray(sender_stream())
    first_end = next(i for i in range(len(raw)) if raw[i] == wire.T_DISK_END and raw[i + 1:i + 9] == (3).to_bytes(8, "big"))
    count = struct.unpack_from(">Q", raw, first_end + 1)[0]
    raw[first_end + 9] ^= 1                             # the digest, with a valid checksum over it
    struct.pack_into(">Q", raw, first_end + 25, xxhash.xxh3_64_intdigest(bytes(raw[first_end:first_end + 25])))
    refuse(bytes(raw), f"digest mismatch at the end of disk vda: the {count} extents received are not the ones sent")
    raw = bytearray(sender_stream())
    struct.pack_into(">Q", raw, first_end + 1, 4)
    struct.pack_into(">Q", raw, first_end + 25, xxhash.xxh3_64_intdigest(bytes(raw[first_end:first_end + 25])))
    refuse(bytes(raw), "extent count mismatch at the end of disk vda: 4 announced, 3 received")
