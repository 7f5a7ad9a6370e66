"""OpenIGTLink wire format: headers v1 and v2 (extended header + metadata), CRC64, message types.

Pure codec, no sockets. Everything here follows the public OpenIGTLink specification:

* header (58 bytes, big endian): version u16, type char[12], device name char[20], timestamp u64
  (upper 32 bits seconds since 1970, lower 32 bits fraction of a second), body size u64, CRC64 u64 of
  the body.
* header version 2 (protocol 3): the body starts with a 12-byte extended header (extended header
  size u16, metadata header size u16, metadata size u32, message id u32), then the content, then the
  metadata header (count u16, per entry key size u16, value encoding u16, value size u32) and the
  metadata itself (key bytes then value bytes per entry).
* CRC64: polynomial 0x42F0E1EBA9EA3693 (ECMA-182), initial value 0, not reflected, no final XOR,
  computed over the whole body.

Message types: TRANSFORM (4x4, mm, in whatever frame the sender states; the robot protocol uses RAS),
STRING, STATUS, POINT, TRAJ; any other type is kept as :class:`RawMessage` (e.g. ``GET_TRANSFORM``
queries with an empty body).

:class:`StreamDecoder` turns a byte stream into messages and :class:`Rejection` records. It checks the
header, the body-size limit and the CRC, skips oversized bodies without buffering them, reports a
truncated message when the stream ends, and resynchronises on the next plausible header after garbage.
"""
from __future__ import annotations

import functools
import logging
import math
import re
import struct
import time
from dataclasses import KW_ONLY, dataclass, field
from enum import IntEnum
from typing import ClassVar

import numpy as np

from TrajectoryPlannerLib.errors import RobotBridgeError

logger = logging.getLogger(__name__)

HEADER_SIZE = 58
EXTENDED_HEADER_SIZE = 12
MAX_NAME_BYTES = 20
TYPE_NAME_BYTES = 12
DEFAULT_MAX_BODY_BYTES = 1 << 20
#: Oversized bodies up to this size are skipped (stream stays in sync); above it the header is treated as garbage.
DEFAULT_MAX_SKIP_BYTES = 1 << 28
#: Bytes of garbage tolerated while resynchronising before the stream is declared unusable.
DEFAULT_RESYNC_LIMIT_BYTES = 1 << 20

_HEADER = struct.Struct(">H12s20sQQQ")
_EXT_HEADER = struct.Struct(">HHII")
_MD_ENTRY = struct.Struct(">HHI")
_STATUS_FIXED = struct.Struct(">Hq20s")
_STRING_FIXED = struct.Struct(">HH")
_POINT = struct.Struct(">64s32s4B3ff20s")
_TRAJ = struct.Struct(">64s32sbB4B3f3ff20s")
_TRANSFORM = struct.Struct(">12f")
_NAME_RE = re.compile(rb"[\x20-\x7e]*\x00*")

MIB_US_ASCII = 3
MIB_UTF8 = 106


class IgtlCodecError(RobotBridgeError):
    """A message cannot be encoded or decoded (bad name, bad content, wrong size)."""


# --------------------------------------------------------------------------------------------- CRC64
_CRC_POLY = 0x42F0E1EBA9EA3693
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _make_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 56
        for _ in range(8):
            crc = ((crc << 1) ^ _CRC_POLY) & _MASK64 if crc & (1 << 63) else (crc << 1) & _MASK64
        table.append(crc)
    return table


_CRC_TABLE = _make_table()


def crc64_python(data: bytes, crc: int = 0) -> int:
    """CRC-64/ECMA-182 as OpenIGTLink uses it (non-reflected, init 0, no final XOR); pure Python."""
    table = _CRC_TABLE
    for b in data:
        crc = table[((crc >> 56) ^ b) & 0xFF] ^ ((crc << 8) & _MASK64)
    return crc


try:  # crcmod (a pyigtl dependency) has a C extension with the same algorithm; used only for speed.
    import crcmod as _crcmod

    _crc_fast = _crcmod.mkCrcFun(0x1_0000_0000_0000_0000 | _CRC_POLY, rev=False, initCrc=0, xorOut=0)
    if _crc_fast(b"123456789") != crc64_python(b"123456789"):  # pragma: no cover - defensive
        _crc_fast = None
except Exception:  # pragma: no cover - crcmod absent
    _crc_fast = None


def crc64(data: bytes) -> int:
    """CRC64 of ``data`` as an unsigned 64-bit integer (OpenIGTLink body checksum)."""
    if _crc_fast is not None:
        return _crc_fast(bytes(data))
    return crc64_python(data)


# ------------------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=4096)
def _encode_name(name: str, size: int, what: str) -> bytes:
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError as exc:
        raise IgtlCodecError(f"The OpenIGTLink {what} {name!r} must be plain ASCII; rename it.") from exc
    if len(raw) > size:
        raise IgtlCodecError(
            f"The OpenIGTLink {what} {name!r} is {len(raw)} bytes, longer than the {size} bytes the protocol "
            "allows; use a shorter name.")
    return raw.ljust(size, b"\0")


def _decode_cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace")


class StatusCode(IntEnum):
    """OpenIGTLink STATUS codes."""

    INVALID = 0
    OK = 1
    UNKNOWN_ERROR = 2
    PANIC = 3
    NOT_FOUND = 4
    ACCESS_DENIED = 5
    BUSY = 6
    TIME_OUT = 7
    OVERFLOW = 8
    CHECKSUM_ERROR = 9
    CONFIG_ERROR = 10
    RESOURCE_ERROR = 11
    UNKNOWN_INSTRUCTION = 12
    NOT_READY = 13
    MANUAL_MODE = 14
    DISABLED = 15
    NOT_PRESENT = 16
    UNKNOWN_VERSION = 17
    HARDWARE_FAILURE = 18
    SHUTDOWN = 19


# ------------------------------------------------------------------------------------------ messages
@dataclass
class IgtlMessage:
    """Common part of every message. ``timestamp`` in seconds since 1970 (0 = now when packed);
    ``metadata`` is sent only with ``header_version`` 2; ``message_id`` is the v2 extended-header id."""

    device_name: str
    _: KW_ONLY
    timestamp: float = 0.0
    metadata: dict = field(default_factory=dict)
    header_version: int = 1
    message_id: int = 0

    type_name: ClassVar[str] = ""

    def __post_init__(self):
        _encode_name(self.device_name, MAX_NAME_BYTES, "device name")
        if self.header_version not in (1, 2):
            raise IgtlCodecError(f"OpenIGTLink header version {self.header_version} is not supported; use 1 or 2.")

    # subclasses implement these two
    def pack_content(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def unpack_content(cls, device_name: str, content: bytes, **common) -> "IgtlMessage":
        raise NotImplementedError

    def content_dict(self) -> dict:
        """JSON-friendly summary of the content (used by session logs)."""
        return {}

    def to_dict(self) -> dict:
        d = {"type": self.type_name, "device": self.device_name, "timestamp": self.timestamp,
             "header_version": self.header_version}
        if self.metadata:
            d["metadata"] = dict(self.metadata)
        d.update(self.content_dict())
        return d

    def pack(self) -> bytes:
        """Header + body bytes ready for the wire."""
        content = self.pack_content()
        if self.header_version == 2:
            items = [(str(k).encode("utf-8"), str(v).encode("utf-8")) for k, v in self.metadata.items()]
            for k, v in items:
                if len(k) > 0xFFFF or len(v) > 0xFFFFFFFF:
                    raise IgtlCodecError("An OpenIGTLink metadata key or value is too long; shorten it.")
            md_header = struct.pack(">H", len(items)) + b"".join(_MD_ENTRY.pack(len(k), MIB_UTF8, len(v)) for k, v in items)
            md = b"".join(k + v for k, v in items)
            ext = _EXT_HEADER.pack(EXTENDED_HEADER_SIZE, len(md_header), len(md), self.message_id & 0xFFFFFFFF)
            body = ext + content + md_header + md
        else:
            body = content
        ts = self.timestamp or time.time()
        sec = int(ts)
        frac = int((ts - sec) * 4294967296.0) & 0xFFFFFFFF
        header = _HEADER.pack(self.header_version, _encode_name(self.type_name, TYPE_NAME_BYTES, "message type"),
                              _encode_name(self.device_name, MAX_NAME_BYTES, "device name"),
                              ((sec & 0xFFFFFFFF) << 32) | frac, len(body), crc64(body))
        return header + body


@dataclass
class TransformMessage(IgtlMessage):
    """4x4 homogeneous transform; translation in mm. Wire order R11 R21 R31 R12 ... TX TY TZ (float32)."""

    matrix: np.ndarray = field(default_factory=lambda: np.eye(4))
    type_name: ClassVar[str] = "TRANSFORM"

    def __post_init__(self):
        super().__post_init__()
        m = np.asarray(self.matrix, dtype=float)
        if m.shape != (4, 4) or not np.isfinite(m).all():
            raise IgtlCodecError(f"A TRANSFORM for {self.device_name} needs a finite 4x4 matrix; got shape {m.shape}.")
        self.matrix = m

    def pack_content(self) -> bytes:
        (a, b, c, tx), (d, e, f, ty), (g, h, i, tz) = self.matrix[:3].tolist()
        return _TRANSFORM.pack(a, d, g, b, e, h, c, f, i, tx, ty, tz)

    @classmethod
    def unpack_content(cls, device_name, content, **common):
        if len(content) != 48:
            raise IgtlCodecError(f"TRANSFORM body is {len(content)} bytes instead of 48")
        v = _TRANSFORM.unpack(content)
        if not all(map(math.isfinite, v)):
            raise IgtlCodecError("TRANSFORM contains non-finite numbers")
        m = np.array([[v[0], v[3], v[6], v[9]], [v[1], v[4], v[7], v[10]], [v[2], v[5], v[8], v[11]],
                      [0.0, 0.0, 0.0, 1.0]])
        # fields were validated above: skip __post_init__ (hot path for tracking streams)
        obj = cls.__new__(cls)
        obj.__dict__.update(device_name=device_name, timestamp=common.get("timestamp", 0.0),
                            metadata=common.get("metadata", {}), header_version=common.get("header_version", 1),
                            message_id=common.get("message_id", 0), matrix=m)
        return obj

    def content_dict(self):
        return {"matrix": np.round(self.matrix, 6).tolist()}


@dataclass
class StringMessage(IgtlMessage):
    """Text message; sent as US-ASCII when possible, else UTF-8 (MIBenum 3 / 106)."""

    text: str = ""
    type_name: ClassVar[str] = "STRING"

    def pack_content(self) -> bytes:
        try:
            raw, enc = self.text.encode("ascii"), MIB_US_ASCII
        except UnicodeEncodeError:
            raw, enc = self.text.encode("utf-8"), MIB_UTF8
        if len(raw) > 0xFFFF:
            raise IgtlCodecError("A STRING message is limited to 65535 bytes; shorten the text.")
        return _STRING_FIXED.pack(enc, len(raw)) + raw

    @classmethod
    def unpack_content(cls, device_name, content, **common):
        if len(content) < 4:
            raise IgtlCodecError(f"STRING body is {len(content)} bytes, shorter than its 4-byte prefix")
        enc, n = _STRING_FIXED.unpack_from(content)
        if n != len(content) - 4:
            raise IgtlCodecError(f"STRING declares {n} bytes but carries {len(content) - 4}")
        raw = bytes(content[4:])
        text = raw.decode("utf-8" if enc == MIB_UTF8 else "ascii", errors="replace")
        return cls(device_name, text, **common)

    def content_dict(self):
        return {"text": self.text}


@dataclass
class StatusMessage(IgtlMessage):
    """Device status: ``code`` (:class:`StatusCode`), ``subcode`` (device specific), ``error_name``
    (<= 20 bytes) and a free ``status_string``."""

    code: int = StatusCode.OK
    subcode: int = 0
    error_name: str = ""
    status_string: str = ""
    type_name: ClassVar[str] = "STATUS"

    def __post_init__(self):
        super().__post_init__()
        _encode_name(self.error_name, MAX_NAME_BYTES, "status error name")
        if not 0 <= int(self.code) <= 0xFFFF:
            raise IgtlCodecError(f"STATUS code {self.code} is out of range.")

    @property
    def ok(self) -> bool:
        return int(self.code) == StatusCode.OK

    def pack_content(self) -> bytes:
        return (_STATUS_FIXED.pack(int(self.code), int(self.subcode), _encode_name(self.error_name, 20, "error name"))
                + self.status_string.encode("utf-8") + b"\0")

    @classmethod
    def unpack_content(cls, device_name, content, **common):
        if len(content) < _STATUS_FIXED.size:
            raise IgtlCodecError(f"STATUS body is {len(content)} bytes, shorter than its 30-byte fixed part")
        code, subcode, name = _STATUS_FIXED.unpack_from(content)
        text = bytes(content[_STATUS_FIXED.size:]).split(b"\0", 1)[0].decode("utf-8", errors="replace")
        return cls(device_name, code=code, subcode=subcode, error_name=_decode_cstr(name), status_string=text, **common)

    def content_dict(self):
        try:
            code_name = StatusCode(int(self.code)).name
        except ValueError:
            code_name = str(self.code)
        return {"code": int(self.code), "code_name": code_name, "subcode": int(self.subcode),
                "error_name": self.error_name, "status_string": self.status_string}


@dataclass
class PointElement:
    """One fiducial: position in mm (frame as agreed by the peers, RAS here), diameter in mm."""

    name: str = ""
    group: str = ""
    rgba: tuple = (255, 255, 255, 255)
    position: tuple = (0.0, 0.0, 0.0)
    diameter: float = 0.0
    owner: str = ""


@dataclass
class PointMessage(IgtlMessage):
    """List of points (136 bytes each)."""

    points: list = field(default_factory=list)
    type_name: ClassVar[str] = "POINT"

    def pack_content(self) -> bytes:
        out = []
        for p in self.points:
            out.append(_POINT.pack(_encode_name(p.name, 64, "point name"), _encode_name(p.group, 32, "point group"),
                                   *[int(c) & 0xFF for c in p.rgba], *map(float, p.position), float(p.diameter),
                                   _encode_name(p.owner, 20, "point owner")))
        return b"".join(out)

    @classmethod
    def unpack_content(cls, device_name, content, **common):
        if len(content) % _POINT.size:
            raise IgtlCodecError(f"POINT body of {len(content)} bytes is not a multiple of {_POINT.size}")
        pts = []
        for off in range(0, len(content), _POINT.size):
            f = _POINT.unpack_from(content, off)
            pts.append(PointElement(_decode_cstr(f[0]), _decode_cstr(f[1]), tuple(f[2:6]), tuple(f[6:9]), f[9],
                                    _decode_cstr(f[10])))
        return cls(device_name, pts, **common)

    def content_dict(self):
        return {"points": [{"name": p.name, "group": p.group, "position": [round(x, 4) for x in p.position],
                            "diameter": p.diameter} for p in self.points]}


@dataclass
class TrajectoryElement:
    """One trajectory: entry and target in mm, ``kind`` 1 entry only, 2 target only, 3 both."""

    name: str = ""
    group: str = ""
    kind: int = 3
    rgba: tuple = (255, 255, 255, 255)
    entry: tuple = (0.0, 0.0, 0.0)
    target: tuple = (0.0, 0.0, 0.0)
    radius: float = 0.0
    owner: str = ""


@dataclass
class TrajectoryMessage(IgtlMessage):
    """TRAJ message (150 bytes per trajectory)."""

    trajectories: list = field(default_factory=list)
    type_name: ClassVar[str] = "TRAJ"

    def pack_content(self) -> bytes:
        return b"".join(
            _TRAJ.pack(_encode_name(t.name, 64, "trajectory name"), _encode_name(t.group, 32, "trajectory group"),
                       int(t.kind), 0, *[int(c) & 0xFF for c in t.rgba], *map(float, t.entry), *map(float, t.target),
                       float(t.radius), _encode_name(t.owner, 20, "trajectory owner"))
            for t in self.trajectories)

    @classmethod
    def unpack_content(cls, device_name, content, **common):
        if len(content) % _TRAJ.size:
            raise IgtlCodecError(f"TRAJ body of {len(content)} bytes is not a multiple of {_TRAJ.size}")
        out = []
        for off in range(0, len(content), _TRAJ.size):
            f = _TRAJ.unpack_from(content, off)
            out.append(TrajectoryElement(_decode_cstr(f[0]), _decode_cstr(f[1]), f[2], tuple(f[4:8]), tuple(f[8:11]),
                                         tuple(f[11:14]), f[14], _decode_cstr(f[15])))
        return cls(device_name, out, **common)

    def content_dict(self):
        return {"trajectories": [{"name": t.name, "entry": list(t.entry), "target": list(t.target)}
                                 for t in self.trajectories]}


@dataclass
class RawMessage(IgtlMessage):
    """Any other message type (``GET_TRANSFORM``, ``IMAGE``...): content kept as bytes."""

    raw_type: str = ""
    content: bytes = b""

    def __post_init__(self):
        super().__post_init__()
        _encode_name(self.raw_type, TYPE_NAME_BYTES, "message type")

    @property
    def type_name(self) -> str:  # type: ignore[override]
        return self.raw_type

    def pack_content(self) -> bytes:
        return bytes(self.content)

    def content_dict(self):
        return {"content_bytes": len(self.content)}


def query_message(type_name: str, device_name: str, **common) -> RawMessage:
    """An empty-body query such as ``GET_TRANSFORM`` for ``CURRENT_POSITION``."""
    return RawMessage(device_name, raw_type=type_name, **common)


MESSAGE_TYPES: dict[str, type] = {c.type_name: c for c in
                                  (TransformMessage, StringMessage, StatusMessage, PointMessage, TrajectoryMessage)}


# ---------------------------------------------------------------------------------------- decoding
@dataclass
class Header:
    version: int
    type_name: str
    device_name: str
    timestamp: float
    body_size: int
    crc: int


@dataclass
class Rejection:
    """Something received and refused: ``reason`` is one of ``malformed_header``, ``oversized``,
    ``crc_mismatch``, ``malformed_body``, ``truncated``, ``unsynchronised``; ``detail`` says what."""

    reason: str
    detail: str
    type_name: str = ""
    device_name: str = ""
    fatal: bool = False

    def to_dict(self) -> dict:
        return {"reason": self.reason, "detail": self.detail, "type": self.type_name, "device": self.device_name,
                "fatal": self.fatal}


def _plausible_name(raw: bytes, allow_empty: bool) -> bool:
    """Printable ASCII followed only by NUL padding (and non-empty unless allowed)."""
    if not allow_empty and raw[:1] == b"\0":
        return False
    return _NAME_RE.fullmatch(raw) is not None


def parse_header(raw: bytes) -> Header | None:
    """Header fields, or None when the 58 bytes cannot be an OpenIGTLink header."""
    version, tname, dname, ts, size, crc = _HEADER.unpack_from(raw)
    if version not in (1, 2) or not _plausible_name(tname, False) or not _plausible_name(dname, True):
        return None
    return Header(version, _decode_cstr(tname), _decode_cstr(dname), (ts >> 32) + (ts & 0xFFFFFFFF) / 4294967296.0,
                  size, crc)


def decode_body(header: Header, body: bytes) -> IgtlMessage:
    """Message from a header and a CRC-checked body; raises IgtlCodecError on any malformed content (never
    another exception, whatever the bytes)."""
    try:
        return _decode_body(header, body)
    except IgtlCodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a malformed message, never a crash
        raise IgtlCodecError(f"{header.type_name} body cannot be decoded ({type(exc).__name__}: {exc})") from exc


def _decode_body(header: Header, body: bytes) -> IgtlMessage:
    common = {"timestamp": header.timestamp, "header_version": header.version}
    content = body
    if header.version == 2:
        if len(body) < EXTENDED_HEADER_SIZE:
            raise IgtlCodecError(f"body of {len(body)} bytes is shorter than the v2 extended header")
        ext_size, mh_size, md_size, msg_id = _EXT_HEADER.unpack_from(body)
        end_content = len(body) - mh_size - md_size
        if ext_size < EXTENDED_HEADER_SIZE or end_content < ext_size:
            raise IgtlCodecError("v2 extended header sizes do not fit the body")
        content = body[ext_size:end_content]
        metadata = {}
        if mh_size:
            mh = body[end_content:end_content + mh_size]
            if mh_size < 2:
                raise IgtlCodecError(f"v2 metadata header of {mh_size} bytes is shorter than its 2-byte count")
            (count,) = struct.unpack_from(">H", mh)
            if mh_size != 2 + count * _MD_ENTRY.size:
                raise IgtlCodecError("v2 metadata header size does not match its entry count")
            pos = end_content + mh_size
            for i in range(count):
                ksize, _enc, vsize = _MD_ENTRY.unpack_from(mh, 2 + i * _MD_ENTRY.size)
                if pos + ksize + vsize > len(body):
                    raise IgtlCodecError("v2 metadata runs past the end of the body")
                key = bytes(body[pos:pos + ksize]).decode("utf-8", errors="replace")
                metadata[key] = bytes(body[pos + ksize:pos + ksize + vsize]).decode("utf-8", errors="replace")
                pos += ksize + vsize
        common["metadata"] = metadata
        common["message_id"] = msg_id
    cls = MESSAGE_TYPES.get(header.type_name)
    if cls is None:
        return RawMessage(header.device_name, raw_type=header.type_name, content=bytes(content), **common)
    try:
        return cls.unpack_content(header.device_name, bytes(content), **common)
    except IgtlCodecError:
        raise
    except (struct.error, ValueError) as exc:
        raise IgtlCodecError(f"{header.type_name} body cannot be decoded ({exc})") from exc


def decode_message(data: bytes) -> IgtlMessage:
    """Decode exactly one complete message (header + body); raises IgtlCodecError when invalid."""
    if len(data) < HEADER_SIZE:
        raise IgtlCodecError(f"message of {len(data)} bytes is shorter than the 58-byte header")
    header = parse_header(data[:HEADER_SIZE])
    if header is None:
        raise IgtlCodecError("bytes do not start with an OpenIGTLink header")
    body = data[HEADER_SIZE:]
    if len(body) != header.body_size:
        raise IgtlCodecError(f"body is {len(body)} bytes, header declares {header.body_size}")
    if crc64(body) != header.crc:
        raise IgtlCodecError("CRC64 of the body does not match the header")
    return decode_body(header, body)


class StreamDecoder:
    """Incremental decoder for one connection: ``feed(bytes)`` returns messages and rejections in order.

    Oversized bodies (> ``max_body_bytes``) are skipped as they stream in; bytes that are not a header
    are discarded until the next plausible header (one ``malformed_header`` rejection per episode, an
    ``unsynchronised`` fatal rejection past ``resync_limit_bytes``). Call :meth:`close` at end of stream
    to learn about a truncated message.
    """

    def __init__(self, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_skip_bytes: int = DEFAULT_MAX_SKIP_BYTES,
                 resync_limit_bytes: int = DEFAULT_RESYNC_LIMIT_BYTES):
        self.max_body_bytes = int(max_body_bytes)
        self.max_skip_bytes = max(int(max_skip_bytes), self.max_body_bytes)
        self.resync_limit_bytes = int(resync_limit_bytes)
        self._buf = bytearray()
        self._header: Header | None = None
        self._skip = 0
        self._garbage = 0          # bytes discarded in the current resync episode
        self._in_resync = False
        self.bytes_discarded = 0
        self.fatal = False

    def feed(self, data: bytes) -> list:
        if self.fatal:
            return []
        out: list = []
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self._buf += data
        buf = self._buf
        pos = 0
        while True:
            if self._skip:
                n = min(self._skip, len(buf) - pos)
                self._skip -= n
                pos += n
                if self._skip:
                    break
            if self._header is None:
                if len(buf) - pos < HEADER_SIZE:
                    break
                header = parse_header(buf[pos:pos + HEADER_SIZE])
                if header is not None and header.body_size > self.max_skip_bytes:
                    header = None
                if header is None:
                    if not self._in_resync:
                        self._in_resync = True
                        out.append(Rejection("malformed_header", "bytes that are not an OpenIGTLink header were "
                                             "received; discarding until the next valid header"))
                    nxt = self._next_candidate(buf, pos + 1)
                    self._garbage += nxt - pos
                    self.bytes_discarded += nxt - pos
                    pos = nxt
                    if self._garbage > self.resync_limit_bytes:
                        self.fatal = True
                        out.append(Rejection("unsynchronised", f"no valid OpenIGTLink header in {self._garbage} "
                                             "bytes; closing the connection", fatal=True))
                        pos = len(buf)
                        break
                    continue
                if self._in_resync:
                    logger.info("OpenIGTLink stream resynchronised after %d discarded bytes", self._garbage)
                    self._in_resync = False
                    self._garbage = 0
                pos += HEADER_SIZE
                if header.body_size > self.max_body_bytes:
                    out.append(Rejection("oversized", f"{header.type_name} {header.device_name!r}: body of {header.body_size} bytes exceeds "
                                         f"the {self.max_body_bytes}-byte limit; skipped", header.type_name,
                                         header.device_name))
                    self._skip = header.body_size
                    continue
                self._header = header
            header = self._header
            if len(buf) - pos < header.body_size:
                break
            body = bytes(buf[pos:pos + header.body_size])
            pos += header.body_size
            self._header = None
            if crc64(body) != header.crc:
                out.append(Rejection("crc_mismatch", f"{header.type_name} {header.device_name!r}: CRC64 of the body "
                                     "does not match the header", header.type_name, header.device_name))
                continue
            try:
                out.append(decode_body(header, body))
            except Exception as exc:  # noqa: BLE001 - decode_body raises only IgtlCodecError; belt and braces
                out.append(Rejection("malformed_body", f"{header.type_name} {header.device_name!r}: {exc}",
                                     header.type_name, header.device_name))
        del buf[:pos]
        return out

    @staticmethod
    def _next_candidate(buf: bytearray, start: int) -> int:
        """Index of the next byte pair that could start a header (version 1 or 2), or where to wait."""
        best = -1
        for marker in (b"\x00\x01", b"\x00\x02"):
            i = buf.find(marker, start)
            if i != -1 and (best == -1 or i < best):
                best = i
        if best == -1:
            # keep the last byte: it may be the 0x00 of a marker split across reads
            return max(start, len(buf) - 1)
        return best

    def close(self) -> list:
        """End of stream: a ``truncated`` rejection if a message was cut short."""
        out = []
        if self._header is not None:
            have = len(self._buf)
            out.append(Rejection("truncated", f"{self._header.type_name} {self._header.device_name!r}: connection "
                                 f"closed after {have} of {self._header.body_size} body bytes",
                                 self._header.type_name, self._header.device_name))
        elif self._buf and not self._in_resync and not self._skip:
            out.append(Rejection("truncated", f"connection closed inside a header ({len(self._buf)} of "
                                 f"{HEADER_SIZE} bytes)"))
        self._buf.clear()
        self._header = None
        return out
