"""OpenIGTLink codec: CRC64, message round trips (header v1/v2), names, stream decoding of bad input."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from TrajectoryPlannerLib.robot import codec as C
from TrajectoryPlannerLib.errors import RobotBridgeError


def _pose():
    a = np.radians(30)
    m = np.eye(4)
    m[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    m[:3, 3] = [12.5, -40.25, 101.0]
    return m


def test_crc64_matches_ecma182_check_value():
    # CRC-64/ECMA-182 (non-reflected, init 0) check value of "123456789"
    assert C.crc64_python(b"123456789") == 0x6C40DF5F0B497347
    assert C.crc64(b"123456789") == 0x6C40DF5F0B497347
    data = bytes(range(256)) * 3
    assert C.crc64(data) == C.crc64_python(data)


@pytest.mark.parametrize("version", [1, 2])
def test_messages_round_trip(version):
    md = {"target_name": "A", "région": "é"} if version == 2 else {}
    msgs = [
        C.TransformMessage("TGT_ab120001", _pose(), header_version=version, metadata=md, message_id=7),
        C.StringMessage("CMD_ab120002", "MOVE_TO_TARGET", header_version=version),
        C.StringMessage("NOTE", "durée 5 µs", header_version=version),
        C.StatusMessage("TARGET", code=C.StatusCode.CONFIG_ERROR, subcode=3, error_name="UNREACHABLE",
                        status_string="target 3 unreachable", header_version=version),
        C.PointMessage("CAPSULES", [C.PointElement("c1", "capsules", (255, 0, 0, 255), (1.5, -2.25, 300.0), 4.0),
                                    C.PointElement("c2", "capsules", (0, 255, 0, 255), (-7.0, 8.0, 9.5), 4.0)],
                       header_version=version),
        C.TrajectoryMessage("PLAN", [C.TrajectoryElement("A", "plan", 3, (1, 2, 3, 4), (0, 50, 80), (0, 20, 30), 1.0)],
                            header_version=version),
        C.query_message("GET_TRANS", "CURRENT_POSITION", header_version=version),
    ]
    for msg in msgs:
        back = C.decode_message(msg.pack())
        assert type(back) is type(msg) and back.device_name == msg.device_name
        assert back.header_version == version
        if version == 2:
            assert back.metadata == {k: str(v) for k, v in msg.metadata.items()}
        if isinstance(msg, C.TransformMessage):
            np.testing.assert_allclose(back.matrix, msg.matrix, atol=1e-5)
            if version == 2:
                assert back.message_id == 7
        elif isinstance(msg, C.StringMessage):
            assert back.text == msg.text
        elif isinstance(msg, C.StatusMessage):
            assert (back.code, back.subcode, back.error_name, back.status_string) == (10, 3, "UNREACHABLE",
                                                                                       "target 3 unreachable")
        elif isinstance(msg, C.PointMessage):
            assert [p.name for p in back.points] == ["c1", "c2"]
            np.testing.assert_allclose([p.position for p in back.points], [(1.5, -2.25, 300.0), (-7, 8, 9.5)],
                                       atol=1e-4)
        elif isinstance(msg, C.TrajectoryMessage):
            np.testing.assert_allclose(back.trajectories[0].target, (0, 20, 30), atol=1e-5)
        else:
            assert back.type_name == "GET_TRANS" and back.content == b""


def test_transform_wire_order_is_column_major_rotation_then_translation():
    m = np.arange(16, dtype=float).reshape(4, 4)
    m[3] = [0, 0, 0, 1]
    body = C.TransformMessage("X", m).pack()[C.HEADER_SIZE:]
    values = struct.unpack(">12f", body)
    assert values[:3] == (m[0, 0], m[1, 0], m[2, 0])          # first rotation column
    assert values[9:] == (m[0, 3], m[1, 3], m[2, 3])          # translation


def test_interoperates_with_pyigtl_both_ways():
    pyigtl = pytest.importorskip("pyigtl")
    m = _pose()
    theirs = pyigtl.TransformMessage(m, device_name="Tracker")
    theirs.header_version = 2
    theirs.metadata = {"k": "v"}
    ours = C.decode_message(theirs.pack())
    np.testing.assert_allclose(ours.matrix, m, atol=1e-5)
    assert ours.metadata == {"k": "v"}
    packed = C.StringMessage("S", "hello", header_version=2, metadata={"a": "b"}).pack()
    hdr = pyigtl.MessageBase.parse_header(packed[:C.HEADER_SIZE])
    msg = pyigtl.MessageBase.create_message(hdr["message_type"])
    msg.unpack(hdr, packed[C.HEADER_SIZE:])
    assert msg.string == "hello" and msg.metadata == {"a": "b"}


def test_rejects_device_name_longer_than_20_bytes():
    with pytest.raises(RobotBridgeError, match="20 bytes"):
        C.StringMessage("A" * 21, "x")
    C.StringMessage("A" * 20, "x").pack()  # exactly 20 is fine
    with pytest.raises(RobotBridgeError, match="ASCII"):
        C.StringMessage("TGT_é", "x")
    with pytest.raises(RobotBridgeError):
        C.TransformMessage("T", np.full((4, 4), np.nan))


def _feed_all(decoder, data, chunk):
    out = []
    for i in range(0, len(data), chunk):
        out += decoder.feed(data[i:i + chunk])
    return out


@pytest.mark.parametrize("chunk", [1, 7, 58, 4096])
def test_stream_decoder_reassembles_any_split(chunk):
    msgs = [C.TransformMessage(f"T{i}", _pose()) for i in range(5)] + [C.StringMessage("S", "x" * 300)]
    data = b"".join(m.pack() for m in msgs)
    out = _feed_all(C.StreamDecoder(), data, chunk)
    assert [o.device_name for o in out] == [m.device_name for m in msgs]


def test_stream_decoder_rejects_wrong_crc_and_keeps_the_next_message():
    bad = bytearray(C.TransformMessage("BAD", _pose()).pack())
    bad[-3] ^= 0x40
    good = C.StringMessage("GOOD", "ok").pack()
    out = C.StreamDecoder().feed(bytes(bad) + good)
    assert isinstance(out[0], C.Rejection) and out[0].reason == "crc_mismatch" and out[0].device_name == "BAD"
    assert out[1].device_name == "GOOD"


def test_stream_decoder_skips_oversized_body_without_buffering_it():
    big = C.StringMessage("BIG", "y" * 5000).pack()
    good = C.StringMessage("GOOD", "ok").pack()
    dec = C.StreamDecoder(max_body_bytes=1000)
    out = _feed_all(dec, big + good, 512)
    assert [o.reason for o in out if isinstance(o, C.Rejection)] == ["oversized"]
    assert [o.device_name for o in out if not isinstance(o, C.Rejection)] == ["GOOD"]
    assert len(dec._buf) == 0


def test_stream_decoder_resynchronises_after_garbage():
    garbage = bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8))
    good = [C.StringMessage("G1", "a").pack(), C.TransformMessage("G2", _pose()).pack()]
    out = _feed_all(C.StreamDecoder(), good[0] + garbage + good[1], 100)
    names = [o.device_name for o in out if not isinstance(o, C.Rejection)]
    rejected = [o.reason for o in out if isinstance(o, C.Rejection)]
    assert names[0] == "G1" and names[-1] == "G2"
    assert "malformed_header" in rejected


def test_stream_decoder_gives_up_cleanly_when_never_in_sync():
    dec = C.StreamDecoder(resync_limit_bytes=2000)
    out = dec.feed(b"\xff" * 5000)
    assert out[-1].reason == "unsynchronised" and out[-1].fatal and dec.fatal


def test_malformed_body_with_valid_crc_is_rejected():
    body = b"\0" * 40  # a TRANSFORM needs 48 bytes
    hdr = struct.pack(">H12s20sQQQ", 1, b"TRANSFORM", b"SHORT", 0, len(body), C.crc64(body))
    out = C.StreamDecoder().feed(hdr + body)
    assert out[0].reason == "malformed_body" and "48" in out[0].detail


def test_truncated_message_reported_at_end_of_stream():
    data = C.TransformMessage("CUT", _pose()).pack()
    dec = C.StreamDecoder()
    assert dec.feed(data[:70]) == []
    out = dec.close()
    assert out[0].reason == "truncated" and "12 of 48" in out[0].detail


def test_v2_extended_header_inconsistent_sizes_rejected():
    body = struct.pack(">HHII", 12, 0, 500, 0) + b"\0" * 48   # metadata size runs past the body
    hdr = struct.pack(">H12s20sQQQ", 2, b"TRANSFORM", b"V2", 0, len(body), C.crc64(body))
    out = C.StreamDecoder().feed(hdr + body)
    assert out[0].reason == "malformed_body"


def test_malformed_v2_metadata_header_is_dropped_once_and_the_stream_goes_on():
    dec = C.StreamDecoder()
    out = dec.feed(malformed_v2_message("BAD") + C.StringMessage("GOOD", "ok").pack())
    assert [o.reason for o in out if isinstance(o, C.Rejection)] == ["malformed_body"]
    assert "metadata header" in out[0].detail
    assert [o.device_name for o in out if not isinstance(o, C.Rejection)] == ["GOOD"]
    assert len(dec._buf) == 0                                   # nothing left behind to re-parse
    assert dec.feed(C.StringMessage("NEXT", "x").pack())[0].device_name == "NEXT"


def test_decoder_never_raises_on_mutated_messages_with_valid_crc():
    rng = np.random.default_rng(7)
    good = [C.TransformMessage("T", _pose(), header_version=2, metadata={"k": "v"}).pack(),
            C.StatusMessage("S", status_string="x", header_version=2).pack(),
            C.StringMessage("S", "hello", header_version=2, metadata={"a": "b"}).pack(),
            C.PointMessage("P", [C.PointElement("p")], header_version=2).pack(),
            C.TrajectoryMessage("J", [C.TrajectoryElement("j")], header_version=2).pack()]
    dec = C.StreamDecoder()
    for i in range(3000):
        raw = bytearray(good[i % len(good)])
        body = raw[C.HEADER_SIZE:]
        for _ in range(int(rng.integers(1, 4))):
            body[int(rng.integers(0, len(body)))] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            body = body[:int(rng.integers(0, len(body)))]
        header = struct.pack(">H12s20sQQQ", 2, bytes(raw[2:14]), bytes(raw[14:34]), 0, len(body), C.crc64(bytes(body)))
        out = dec.feed(header + bytes(body))                    # must never raise
        assert all(isinstance(o, (C.Rejection, C.IgtlMessage)) for o in out)
    assert len(dec._buf) == 0
    assert dec.feed(C.StringMessage("END", "x").pack())[0].device_name == "END"


def malformed_v2_message(device="MALFORMED"):
    """STRING v2 message with a 1-byte metadata header and a valid CRC (built here, independently of the
    simulator's fault)."""
    content = struct.pack(">HH", 3, 1) + b"x"
    body = struct.pack(">HHII", 12, 1, 0, 0) + content + b"\x00"
    return struct.pack(">H12s20sQQQ", 2, b"STRING", device.encode().ljust(20, b"\0"), 0, len(body),
                       C.crc64(body)) + body
