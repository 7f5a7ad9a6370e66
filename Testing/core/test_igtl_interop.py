"""Interoperability with the real C++ OpenIGTLink library (Debian libopenigtlink-dev + openigtlink-examples).

Our client talks to its ReceiveServer (which checks our CRC before printing), StringEchoServer and
StatusServer; its TrackerClient talks to our server. Skips with the reason when the packages are absent.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from TrajectoryPlannerLib.robot import codec as C
from TrajectoryPlannerLib.robot.transport import IgtlClient, IgtlServer

_HELPER = Path(__file__).resolve().parents[1] / "interop" / "build_igtl_examples.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("build_igtl_examples", _HELPER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    why = mod.missing_requirements()
    if why:
        pytest.skip(f"C++ OpenIGTLink interop skipped: {why}")
    return mod.build_examples()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class CppServer:
    def __init__(self, exe, out_dir: Path):
        self.port = _free_port()
        self.out, self.err = out_dir / f"{exe.name}.out", out_dir / f"{exe.name}.err"
        line_buffered = ["stdbuf", "-oL", "-eL"] if shutil.which("stdbuf") else []   # keep stdout on terminate
        self.proc = subprocess.Popen(line_buffered + [str(exe), str(self.port)],
                                     stdout=self.out.open("w"), stderr=self.err.open("w"))

    def client(self) -> IgtlClient:
        cl = IgtlClient("127.0.0.1", self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                cl.connect(timeout=1)
                return cl
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    cl.close()
                    raise
                time.sleep(0.05)

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        return self.out.read_text() + self.err.read_text()


def _wait_for(path_fn, pattern, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if re.search(pattern, path_fn()):
            return True
        time.sleep(0.05)
    return False


def test_our_client_to_cpp_receive_server(peers, tmp_path):
    srv = CppServer(peers["ReceiveServer"], tmp_path)
    try:
        cl = srv.client()
        m = np.eye(4)
        m[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
        m[:3, 3] = [11.5, -22.25, 33.0]
        cl.send(C.TransformMessage("TGT_1", m))
        cl.send(C.StringMessage("CMD_1", "TARGETING"))
        cl.send(C.StatusMessage("TARGET", code=C.StatusCode.CONFIG_ERROR, subcode=3, error_name="UNREACHABLE",
                                status_string="target out of reach"))
        cl.send(C.PointMessage("CAPSULES", [C.PointElement("c1", "caps", (1, 2, 3, 4), (1.5, 2.5, 3.5), 4.0)]))
        bad = bytearray(C.TransformMessage("BAD", m * 7).pack())
        bad[-1] ^= 1                                  # wrong CRC: the C++ side must refuse to print it
        cl.send_bytes(bytes(bad))
        assert _wait_for(lambda: srv.err.read_text(), r"Receiving TRANSFORM[\s\S]*Receiving TRANSFORM")
        cl.close()
    finally:
        text = srv.stop()
    assert "String: TARGETING" in text
    assert re.search(r"Code\s*: 10\s+SubCode\s*: 3\s+Error Name: UNREACHABLE\s+Status\s*: target out of reach", text)
    pos = re.search(r"Position\s*: \( ([-\d.]+), ([-\d.]+), ([-\d.]+) \)", text)
    np.testing.assert_allclose([float(v) for v in pos.groups()], [1.5, 2.5, 3.5], atol=1e-5)
    rows = re.findall(r"^([-\d.e]+), ([-\d.e]+), ([-\d.e]+), ([-\d.e]+)$", text, re.M)
    assert len(rows) == 4, "exactly one matrix printed: the CRC-corrupted one was refused"
    np.testing.assert_allclose(np.array(rows, float), m, atol=1e-5)


def test_our_client_to_cpp_string_echo_server(peers, tmp_path):
    srv = CppServer(peers["StringEchoServer"], tmp_path)
    try:
        cl = srv.client()
        for text in ("START_UP", "MOVE_TO_TARGET", "x" * 500):
            cl.send(C.StringMessage("CMD_0001", text))
            echo = cl.receive(("STRING", "StringEchoServer"), timeout=5)
            assert echo is not None and echo.text == text
        assert cl.rejections == []          # their CRC64 matches ours
        cl.close()
    finally:
        srv.stop()


def test_our_client_reads_cpp_status_server(peers, tmp_path):
    srv = CppServer(peers["StatusServer"], tmp_path)
    try:
        cl = srv.client()
        st = cl.receive(("STATUS", "Device"), timeout=5)
        cl.close()
    finally:
        srv.stop()
    assert st is not None
    assert (int(st.code), st.subcode, st.error_name) == (1, 128, "OK!")
    assert st.status_string == "This is a test to send status message."


def test_cpp_tracker_client_to_our_server(peers):
    received = []
    server = IgtlServer(0, on_message=lambda conn, msg: received.append(msg))
    proc = subprocess.Popen([str(peers["TrackerClient"]), "127.0.0.1", str(server.port), "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while len(received) < 10 and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        server.stop()
    assert len(received) >= 10 and server.rejections == []
    for msg in received[:10]:
        assert msg.type_name == "TRANSFORM" and msg.device_name == "Tracker"
        r, t = msg.matrix[:3, :3], msg.matrix[:3, 3]
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-3)           # a rotation
        assert abs(t[0] - t[2]) < 1e-3 and abs(np.hypot(t[0], t[1]) - 50.0) < 1e-3   # (50cos, 50sin, 50cos)
