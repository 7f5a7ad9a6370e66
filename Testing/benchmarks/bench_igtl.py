"""OpenIGTLink benchmark: round-trip latency and sustained TRANSFORM throughput over loopback.

Side by side in one run: SmartBiopsy's transport (TrajectoryPlannerLib.robot.transport), stock pyigtl
(OpenIGTLinkServer / OpenIGTLinkClient, ``send_message(wait=True)`` and ``wait_for_message``), and a raw
blocking socket echo as the floor. Round trip = client sends a TRANSFORM, server echoes it, client has
it decoded. Throughput = client sends TRANSFORMs carrying a sequence number as fast as the API allows;
the server counts them and checks order (loss = sent - received in order).

Every loop is bounded in count and in time. Usage::

    python Testing/benchmarks/bench_igtl.py [--rtt-n 2000] [--tput-n 20000] [--pyigtl-n 200]
"""
from __future__ import annotations

import argparse
import logging
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "TrajectoryPlanner"))
sys.path.insert(0, str(ROOT / "SmartBiopsyCore"))

from TrajectoryPlannerLib.robot import codec as C  # noqa: E402
from TrajectoryPlannerLib.robot.transport import IgtlClient, IgtlServer  # noqa: E402

TIME_LIMIT_S = 30.0


def _stats(rtts):
    a = np.sort(np.asarray(rtts)) * 1e3
    return float(np.median(a)), float(a[int(0.95 * (len(a) - 1))])


def _matrix(i):
    m = np.eye(4)
    m[:3, 3] = [float(i), 0.5, -0.5]
    return m


# ------------------------------------------------------------------------------------------ ours
def bench_ours(rtt_n, tput_n, header_version=1):
    srv = IgtlServer(0, on_message=lambda conn, msg: conn.send(msg))
    cl = IgtlClient("127.0.0.1", srv.port)
    cl.connect()
    msg = C.TransformMessage("RTT", _matrix(1), header_version=header_version)
    for _ in range(50):  # warm-up
        cl.send(msg)
        cl.receive(timeout=1)
    rtts = []
    end = time.monotonic() + TIME_LIMIT_S
    for _ in range(rtt_n):
        t0 = time.perf_counter()
        cl.send(msg)
        if cl.receive(timeout=1) is None:
            break
        rtts.append(time.perf_counter() - t0)
        if time.monotonic() > end:
            break
    cl.close()
    srv.stop()

    state = {"n": 0, "in_order": 0, "last": -1, "t_last": 0.0}
    done = threading.Event()

    def count(conn, m):
        i = int(m.matrix[0, 3])
        state["n"] += 1
        if i == state["last"] + 1:
            state["in_order"] += 1
        state["last"] = i
        state["t_last"] = time.perf_counter()
        if state["n"] >= tput_n:
            done.set()

    srv = IgtlServer(0, on_message=count)
    cl = IgtlClient("127.0.0.1", srv.port)
    cl.connect()
    msgs = [C.TransformMessage("TPUT", _matrix(i), header_version=header_version) for i in range(tput_n)]
    t0 = time.perf_counter()
    for m in msgs:
        cl.send(m)
    done.wait(TIME_LIMIT_S)
    elapsed = (state["t_last"] or time.perf_counter()) - t0
    cl.close()
    srv.stop()
    med, p95 = _stats(rtts)
    return {"median_ms": med, "p95_ms": p95, "rtt_n": len(rtts), "tput": state["n"] / elapsed if elapsed else 0.0,
            "sent": tput_n, "received": state["in_order"]}


# ---------------------------------------------------------------------------------------- pyigtl
class _CountingDict(dict):
    """pyigtl keeps only the newest message per device; count every store to see what arrived."""

    def __init__(self):
        super().__init__()
        self.n = 0
        self.in_order = 0
        self.last = -1
        self.t_last = 0.0

    def __setitem__(self, key, value):
        self.n += 1
        i = int(round(value.matrix[0][3]))
        if i == self.last + 1:
            self.in_order += 1
        self.last = i
        self.t_last = time.perf_counter()
        super().__setitem__(key, value)


def bench_pyigtl(rtt_n, tput_n):
    import pyigtl

    logging.getLogger("pyigtl").setLevel(logging.ERROR)
    port = _free_port()
    srv = pyigtl.OpenIGTLinkServer(port=port, local_server=True)
    cl = pyigtl.OpenIGTLinkClient(host="127.0.0.1", port=port)
    end = time.monotonic() + 10
    while not (srv.is_connected() and cl.is_connected()) and time.monotonic() < end:
        time.sleep(0.01)
    rtts = []
    end = time.monotonic() + TIME_LIMIT_S
    for i in range(rtt_n):
        m = pyigtl.TransformMessage(_matrix(i), device_name="RTT")
        t0 = time.perf_counter()
        cl.send_message(m, wait=True)
        got = srv.wait_for_message("RTT", timeout=2)
        if got is None:
            break
        srv.send_message(got, wait=True)
        back = cl.wait_for_message("RTT", timeout=2)
        if back is None:
            break
        rtts.append(time.perf_counter() - t0)
        if time.monotonic() > end:
            break
    counter = _CountingDict()
    with srv.lock_incoming_messages:
        srv.incoming_messages = counter
    t0 = time.perf_counter()
    end = time.monotonic() + TIME_LIMIT_S
    sent = 0
    for i in range(tput_n):
        cl.send_message(pyigtl.TransformMessage(_matrix(i), device_name="TPUT"), wait=True)
        sent += 1
        if time.monotonic() > end:
            break
    end = time.monotonic() + 2
    while counter.n < sent and time.monotonic() < end:
        time.sleep(0.005)
    elapsed = (counter.t_last or time.perf_counter()) - t0
    cl.stop()
    srv.stop()
    med, p95 = _stats(rtts) if rtts else (float("nan"), float("nan"))
    return {"median_ms": med, "p95_ms": p95, "rtt_n": len(rtts), "tput": counter.n / elapsed if elapsed else 0.0,
            "sent": sent, "received": counter.in_order}


# ---------------------------------------------------------------------------------------- raw floor
def bench_raw(rtt_n):
    msg = C.TransformMessage("RAW", _matrix(1)).pack()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)

    def echo():
        conn, _ = lsock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(TIME_LIMIT_S)
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        conn.close()

    th = threading.Thread(target=echo, daemon=True)
    th.start()
    c = socket.create_connection(lsock.getsockname())
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(rtt_n):
        t0 = time.perf_counter()
        c.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(c.recv(65536))
        rtts.append(time.perf_counter() - t0)
    c.close()
    th.join(2)
    lsock.close()
    med, p95 = _stats(rtts)
    return {"median_ms": med, "p95_ms": p95, "rtt_n": len(rtts), "tput": float("nan"), "sent": 0, "received": 0}


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rtt-n", type=int, default=2000, help="round trips for ours and raw (default 2000)")
    ap.add_argument("--tput-n", type=int, default=20000, help="TRANSFORMs for our throughput run (default 20000)")
    ap.add_argument("--pyigtl-n", type=int, default=200, help="round trips and messages for pyigtl (default 200)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    rows = [("raw socket echo (floor)", bench_raw(args.rtt_n)),
            ("SmartBiopsy igtl_transport v1", bench_ours(args.rtt_n, args.tput_n, 1)),
            ("SmartBiopsy igtl_transport v2", bench_ours(args.rtt_n, args.tput_n, 2)),
            ("pyigtl 0.3 (wait=True)", bench_pyigtl(args.pyigtl_n, args.pyigtl_n))]
    ref = rows[-1][1]
    print(f"{'implementation':<32} {'RTT median ms':>13} {'RTT p95 ms':>11} {'n':>6} {'TRANSFORM/s':>12} "
          f"{'sent':>7} {'recv in order':>13} {'lost':>6} {'RTT x':>7} {'tput x':>7}")
    for name, r in rows:
        lost = r["sent"] - r["received"] if r["sent"] else 0
        rtt_ratio = ref["median_ms"] / r["median_ms"] if r["median_ms"] else float("nan")
        tput_ratio = r["tput"] / ref["tput"] if ref["tput"] else float("nan")
        print(f"{name:<32} {r['median_ms']:>13.3f} {r['p95_ms']:>11.3f} {r['rtt_n']:>6d} {r['tput']:>12.0f} "
              f"{r['sent']:>7d} {r['received']:>13d} {lost:>6d} {rtt_ratio:>7.1f} {tput_ratio:>7.1f}")
    print("RTT x / tput x: speed-up relative to pyigtl (higher is better). Aim: median RTT <= 1 ms, "
          ">= 5000 TRANSFORM/s with zero loss.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
