"""OpenIGTLink transport over loopback: echo, TCP_NODELAY, bad input rejected while the server stays up."""
from __future__ import annotations

import socket
import struct
import time

import numpy as np
import pytest

from TrajectoryPlannerLib.robot import codec as C
from TrajectoryPlannerLib.errors import RobotBridgeError
from TrajectoryPlannerLib.robot.transport import IgtlClient, IgtlServer


@pytest.fixture
def echo_server():
    srv = IgtlServer(0, on_message=lambda conn, msg: conn.send(msg), max_body_bytes=4096)
    yield srv
    srv.stop()


def _wait(pred, timeout=3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_server_binds_loopback_by_default(echo_server):
    assert echo_server.host == "127.0.0.1"


def test_client_round_trip_and_nodelay(echo_server):
    with IgtlClient("127.0.0.1", echo_server.port) as cl:
        cl.connect()
        assert cl.connection.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        m = np.eye(4)
        for i in range(50):
            m[:3, 3] = [i, 2 * i, -i]
            cl.send(C.TransformMessage("SEQ", m, header_version=1 + i % 2))
            back = cl.receive(("TRANSFORM", "SEQ"), timeout=2)
            assert back is not None and back.header_version == 1 + i % 2
            np.testing.assert_allclose(back.matrix[:3, 3], [i, 2 * i, -i])


def test_bursts_arrive_complete_and_in_order(echo_server):
    with IgtlClient("127.0.0.1", echo_server.port) as cl:
        cl.connect()
        n = 2000
        for i in range(n):
            m = np.eye(4)
            m[0, 3] = i
            cl.send(C.TransformMessage("B", m))
        got = [cl.receive(timeout=5) for _ in range(n)]
        assert all(g is not None for g in got)
        assert [int(g.matrix[0, 3]) for g in got] == list(range(n))


def test_server_rejects_bad_input_reports_it_and_stays_up(echo_server):
    with IgtlClient("127.0.0.1", echo_server.port) as cl:
        cl.connect()
        bad_crc = bytearray(C.TransformMessage("BADCRC", np.eye(4)).pack())
        bad_crc[-1] ^= 1
        cl.send_bytes(bytes(bad_crc))
        cl.send_bytes(C.StringMessage("HUGE", "z" * 6000).pack())            # over the 4096-byte limit
        body = b"\0" * 10
        cl.send_bytes(struct.pack(">H12s20sQQQ", 1, b"TRANSFORM", b"SHORT", 0, 10, C.crc64(body)) + body)
        cl.send_bytes(b"\x13\x37 not igtl at all " * 10)
        cl.send(C.StringMessage("AFTER", "still here"))
        after = cl.receive(("STRING", "AFTER"), timeout=3)
        assert after is not None and after.text == "still here"
        reasons = {}
        while (st := cl.receive(("STATUS", "REJECTED"), timeout=0.5)) is not None:
            reasons[st.error_name] = st
        assert set(reasons) == {"crc_mismatch", "oversized", "malformed_body", "malformed_header"}
        assert reasons["crc_mismatch"].code == C.StatusCode.CHECKSUM_ERROR and "BADCRC" in reasons["crc_mismatch"].status_string
        assert reasons["oversized"].code == C.StatusCode.OVERFLOW and "HUGE" in reasons["oversized"].status_string
    # a truncated message: the peer closes mid-body; the server records it and accepts new clients
    raw = socket.create_connection(("127.0.0.1", echo_server.port))
    raw.sendall(C.TransformMessage("CUT", np.eye(4)).pack()[:80])
    raw.close()
    assert _wait(lambda: any(r.reason == "truncated" for r in echo_server.rejections))
    with IgtlClient("127.0.0.1", echo_server.port) as cl2:
        cl2.connect()
        cl2.send(C.StringMessage("NEW", "hello"))
        assert cl2.receive(("STRING", "NEW"), timeout=3) is not None


def test_unsynchronisable_stream_closes_only_that_connection():
    srv = IgtlServer(0, on_message=lambda c, m: c.send(m))
    try:
        raw = socket.create_connection(("127.0.0.1", srv.port))
        raw.sendall(b"\xff" * (1 << 20) + b"\xff" * 4096)
        raw.settimeout(3)
        data = b""
        try:
            while chunk := raw.recv(65536):
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        raw.close()
        assert any(r.reason == "unsynchronised" for r in srv.rejections)
        with IgtlClient("127.0.0.1", srv.port) as cl:
            cl.connect()
            cl.send(C.StringMessage("OK", "x"))
            assert cl.receive(("STRING", "OK"), timeout=3) is not None
    finally:
        srv.stop()


def test_send_after_server_stop_raises_clear_error():
    srv = IgtlServer(0)
    cl = IgtlClient("127.0.0.1", srv.port)
    cl.connect()
    srv.stop()
    assert _wait(lambda: not cl.connected)
    with pytest.raises(RobotBridgeError, match="reconnect"):
        cl.send(C.StringMessage("X", "y"))
    cl.close()


def test_connect_refused_is_a_clear_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with IgtlClient("127.0.0.1", port) as cl:
        with pytest.raises(RobotBridgeError, match="Cannot connect"):
            cl.connect(timeout=1)


def test_malformed_v2_message_costs_one_rejection_and_the_connection_goes_on(echo_server):
    with IgtlClient("127.0.0.1", echo_server.port) as cl:
        cl.connect()
        for _ in range(3):
            cl.send_bytes(malformed_v2_message())
        cl.send(C.StringMessage("AFTER", "x"))
        assert cl.receive(("STRING", "AFTER"), timeout=3) is not None
    assert [r.reason for r in echo_server.rejections] == ["malformed_body"] * 3
    assert all(len(c.decoder._buf) == 0 for c in echo_server.connections)


def test_server_limits_simultaneous_connections_and_keeps_serving():
    srv = IgtlServer(0, on_message=lambda c, m: c.send(m), max_connections=3)
    socks = []
    try:
        for _ in range(6):
            socks.append(socket.create_connection(("127.0.0.1", srv.port)))
        assert _wait(lambda: srv.refused_connections == 3)
        assert len(srv.connections) == 3
        refused = 0
        for s in socks[3:]:
            s.settimeout(3)
            data = s.recv(4096)
            msg = C.decode_message(data) if data else None
            refused += msg is not None and msg.device_name == "REJECTED" and msg.code == C.StatusCode.RESOURCE_ERROR
        assert refused == 3
        for s in socks[:3]:
            s.close()
        assert _wait(lambda: len(srv.connections) == 0)
        with IgtlClient("127.0.0.1", srv.port) as cl:
            cl.connect()
            cl.send(C.StringMessage("OK", "x"))
            assert cl.receive(("STRING", "OK"), timeout=3) is not None
    finally:
        for s in socks:
            s.close()
        srv.stop()


def test_idle_connections_are_closed_after_the_idle_timeout():
    srv = IgtlServer(0, on_message=lambda c, m: c.send(m), idle_timeout_s=0.3)
    try:
        idle = socket.create_connection(("127.0.0.1", srv.port))
        assert _wait(lambda: len(srv.connections) == 1)
        assert _wait(lambda: len(srv.connections) == 0, timeout=10) and srv.idle_closed == 1
        idle.settimeout(3)
        assert idle.recv(10) == b""                                # closed by the server
        idle.close()
    finally:
        srv.stop()


def test_accept_loop_pauses_instead_of_spinning_when_out_of_descriptors():
    import errno

    srv = IgtlServer(0)
    calls = {"n": 0}
    real = srv._lsock

    class NoDescriptors:
        def fileno(self):
            return real.fileno()

        def accept(self):
            calls["n"] += 1
            raise OSError(errno.EMFILE, "Too many open files")

        def close(self):
            real.close()

    try:
        srv.loop.run_sync(lambda: setattr(srv, "_lsock", NoDescriptors()))
        waiting = socket.create_connection(("127.0.0.1", srv.port))   # makes the listening socket readable
        time.sleep(1.0)
        assert 1 <= calls["n"] <= 20                                   # a few retries, not a busy loop
        assert srv.accept_pauses >= 1
        waiting.close()
    finally:
        srv.stop()


def malformed_v2_message(device="MALFORMED"):
    """STRING v2 message with a 1-byte metadata header and a valid CRC (built here, independently of the
    simulator's fault)."""
    content = struct.pack(">HH", 3, 1) + b"x"
    body = struct.pack(">HHII", 12, 1, 0, 0) + content + b"\x00"
    return struct.pack(">H12s20sQQQ", 2, b"STRING", device.encode().ljust(20, b"\0"), 0, len(body),
                       C.crc64(body)) + body


def test_listening_observer_is_not_closed_as_idle_while_it_receives():
    srv = IgtlServer(0, idle_timeout_s=0.3)
    try:
        with IgtlClient("127.0.0.1", srv.port) as obs:
            obs.connect()
            assert _wait(lambda: len(srv.connections) == 1)
            for i in range(12):                                     # 1.2 s of broadcasts, never a byte back
                srv.broadcast(C.StringMessage("CURRENT_STATUS", str(i)))
                time.sleep(0.1)
            assert obs.connected and srv.idle_closed == 0
            assert _wait(lambda: srv.idle_closed == 1, timeout=10)   # closed once the broadcasts stop
    finally:
        srv.stop()
