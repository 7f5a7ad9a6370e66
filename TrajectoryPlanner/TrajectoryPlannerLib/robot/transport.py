"""OpenIGTLink transport: an event-driven client and server over TCP.

One background thread per client or server runs a ``selectors`` loop that sleeps until a socket is
readable/writable, a timer is due or another thread wakes it (socket pair); nothing polls at a fixed
interval. Sockets use ``TCP_NODELAY``. Sending from any thread writes straight to the socket when its
buffer is free (lowest latency) and leaves the rest to the loop.

Received bytes go through :class:`~TrajectoryPlannerLib.robot.codec.StreamDecoder` (header check,
body-size limit, CRC64, resynchronisation). Messages go to ``on_message(connection, message)`` (called
in the loop thread; keep it short) or, for a client without a handler, to its :class:`Inbox`.
Rejections are logged, kept in ``connection.rejections`` and passed to ``on_reject``; a server also
tells the peer with a STATUS message named ``REJECTED`` (code CHECKSUM_ERROR, OVERFLOW or INVALID).

Servers bind 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from typing import Callable

from TrajectoryPlannerLib.errors import RobotBridgeError
from TrajectoryPlannerLib.robot.codec import (DEFAULT_MAX_BODY_BYTES, IgtlMessage, Rejection, StatusCode, StatusMessage,
                         StreamDecoder)

logger = logging.getLogger(__name__)

#: Bytes allowed to wait in a connection's send buffer before ``send`` refuses (peer not reading).
MAX_PENDING_SEND_BYTES = 64 << 20
#: Default limits of every server: simultaneous clients, seconds without any byte received before a
#: client is closed (None = never), rejections kept per connection / server, rejections logged per connection.
DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_IDLE_TIMEOUT_S = 300.0
MAX_KEPT_REJECTIONS = 1000
MAX_LOGGED_REJECTIONS = 20
_REJECTION_CODES = {"crc_mismatch": StatusCode.CHECKSUM_ERROR, "oversized": StatusCode.OVERFLOW}


class EventLoop:
    """A selector loop in a daemon thread with thread-safe ``call_soon`` and ``call_later``."""

    def __init__(self, name: str = "igtl-loop"):
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._ready: collections.deque = collections.deque()
        self._timers: list = []
        self._seq = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (buffer full) or shutting down

    def call_soon(self, fn: Callable, *args):
        with self._lock:
            self._ready.append((fn, args))
        if not self.in_loop_thread:
            self._wake()

    def call_later(self, delay_s: float, fn: Callable, *args):
        """Run ``fn(*args)`` in the loop thread after ``delay_s`` seconds; returns a handle for :meth:`cancel`."""
        handle = [time.monotonic() + max(0.0, delay_s), next(self._seq), fn, args, False]
        with self._lock:
            heapq.heappush(self._timers, handle)
        if not self.in_loop_thread:
            self._wake()
        return handle

    @staticmethod
    def cancel(handle):
        if handle is not None:
            handle[4] = True

    def run_sync(self, fn: Callable, *args, timeout: float = 5.0):
        """Run ``fn`` in the loop thread and return its result (or raise its exception)."""
        if self.in_loop_thread:
            return fn(*args)
        done = threading.Event()
        box: dict = {}

        def call():
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # handed back to the caller
                box["error"] = exc
            finally:
                done.set()

        self.call_soon(call)
        if not done.wait(timeout):
            raise RobotBridgeError("The OpenIGTLink network thread did not respond; restart the connection.")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def stop(self, timeout: float = 2.0):
        self._stopping = True
        self._wake()
        if not self.in_loop_thread:
            self._thread.join(timeout)

    def _run(self):
        while not self._stopping:
            with self._lock:
                timeout = None
                if self._ready:
                    timeout = 0
                elif self._timers:
                    timeout = max(0.0, self._timers[0][0] - time.monotonic())
            try:
                events = self.selector.select(timeout)
            except OSError:  # pragma: no cover - selector closed under us
                break
            for key, mask in events:
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                try:
                    key.data(mask)
                except Exception:
                    logger.exception("OpenIGTLink socket handler failed")
            now = time.monotonic()
            with self._lock:
                ready = list(self._ready)
                self._ready.clear()
                while self._timers and self._timers[0][0] <= now:
                    h = heapq.heappop(self._timers)
                    if not h[4]:
                        ready.append((h[2], h[3]))
            for fn, args in ready:
                try:
                    fn(*args)
                except Exception:
                    logger.exception("OpenIGTLink loop callback failed")
        for key in list(self.selector.get_map().values()):
            try:
                key.fileobj.close()
            except OSError:
                pass
        self.selector.close()
        self._wake_w.close()


class Connection:
    """One TCP peer. ``send`` is thread-safe; callbacks run in the loop thread."""

    def __init__(self, loop: EventLoop, sock: socket.socket, *, max_body_bytes: int,
                 on_message: Callable | None, on_reject: Callable | None, on_close: Callable | None,
                 on_sent: Callable | None = None, report_rejections: bool = False):
        self.loop = loop
        self.sock = sock
        try:
            self.peer = "%s:%d" % sock.getpeername()[:2]
        except OSError:
            self.peer = "?"
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = StreamDecoder(max_body_bytes=max_body_bytes)
        self.on_message = on_message
        self.on_reject = on_reject
        self.on_close = on_close
        self.on_sent = on_sent
        self.report_rejections = report_rejections
        self.rejections: list[Rejection] = []
        self.rejections_total = 0
        self.messages_received = 0
        self.messages_sent = 0
        self.last_activity = time.monotonic()
        self._out = bytearray()
        self._wlock = threading.Lock()
        self._closed = False
        self._writing = False
        loop.run_sync(self._register)

    def _register(self):
        self.loop.selector.register(self.sock, selectors.EVENT_READ, self._on_event)

    @property
    def connected(self) -> bool:
        return not self._closed

    # ------------------------------------------------------------------ sending
    def send(self, message: IgtlMessage):
        """Pack and send one message; raises RobotBridgeError when the connection is closed."""
        data = message.pack()
        self.send_bytes(data)
        self.messages_sent += 1
        if self.on_sent is not None:
            try:
                self.on_sent(self, message)
            except Exception:
                logger.exception("on_sent callback failed")

    def send_bytes(self, data: bytes):
        """Raw bytes (also used by tests to send malformed input)."""
        with self._wlock:
            if self._closed:
                raise RobotBridgeError(f"The OpenIGTLink connection to {self.peer} is closed; reconnect and retry.")
            if not self._out:
                try:
                    n = self.sock.send(data)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    self.loop.call_soon(self._close_now, f"send failed: {exc}")
                    raise RobotBridgeError(
                        f"Sending to {self.peer} failed ({exc}); check the robot connection and reconnect.") from exc
                if n:
                    self.last_activity = time.monotonic()
                if n == len(data):
                    return
                self._out += data[n:]
            else:
                if len(self._out) > MAX_PENDING_SEND_BYTES:
                    raise RobotBridgeError(f"{self.peer} is not reading what is sent ({len(self._out)} bytes "
                                           "pending); check the receiving program.")
                self._out += data
            need_writer = not self._writing
            self._writing = True
        if need_writer:
            self.loop.call_soon(self._enable_write)

    def _enable_write(self):
        if not self._closed:
            try:
                self.loop.selector.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._on_event)
            except (KeyError, ValueError, OSError):
                pass

    def _flush(self):
        with self._wlock:
            if self._out:
                try:
                    n = self.sock.send(self._out)
                except BlockingIOError:
                    return
                except OSError as exc:
                    self._out.clear()
                    self.loop.call_soon(self._close_now, f"send failed: {exc}")
                    return
                del self._out[:n]
            if not self._out:
                self._writing = False
                try:
                    self.loop.selector.modify(self.sock, selectors.EVENT_READ, self._on_event)
                except (KeyError, ValueError, OSError):
                    pass

    # ---------------------------------------------------------------- receiving
    def _on_event(self, mask):
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ and not self._closed:
            try:
                data = self.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._close_now(f"receive failed: {exc}")
                return
            if not data:
                self._close_now("peer closed the connection")
                return
            self.last_activity = time.monotonic()
            try:
                events = self.decoder.feed(data)
            except Exception as exc:  # noqa: BLE001 - a decoder bug must cost this connection, not the loop
                logger.error("OpenIGTLink input from %s could not be decoded (%s); closing the connection",
                             self.peer, exc)
                self._close_now("undecodable input")
                return
            self._dispatch(events)
            if self.decoder.fatal:
                self._close_now("stream could not be resynchronised")

    def _dispatch(self, events):
        for ev in events:
            if isinstance(ev, Rejection):
                self._reject(ev)
                continue
            self.messages_received += 1
            if self.on_message is not None:
                try:
                    self.on_message(self, ev)
                except Exception:
                    logger.exception("OpenIGTLink message handler failed for %s %s", ev.type_name, ev.device_name)

    def _reject(self, rej: Rejection):
        self.rejections.append(rej)
        del self.rejections[:-MAX_KEPT_REJECTIONS]
        self.rejections_total += 1
        if self.rejections_total <= MAX_LOGGED_REJECTIONS:
            logger.warning("OpenIGTLink from %s rejected (%s): %s", self.peer, rej.reason, rej.detail)
        elif self.rejections_total == MAX_LOGGED_REJECTIONS + 1:
            logger.warning("OpenIGTLink from %s: more rejections; no longer logged (counted in rejections_total)",
                           self.peer)
        if self.on_reject is not None:
            try:
                self.on_reject(self, rej)
            except Exception:
                logger.exception("on_reject callback failed")
        if self.report_rejections and not self._closed and rej.reason != "truncated":
            try:
                self.send(StatusMessage("REJECTED", code=_REJECTION_CODES.get(rej.reason, StatusCode.INVALID),
                                        error_name=rej.reason[:20], status_string=rej.detail))
            except RobotBridgeError:
                pass

    def close(self, reason: str = "closed locally"):
        if self.loop.in_loop_thread:
            self._close_now(reason)
        else:
            try:
                self.loop.run_sync(self._close_now, reason)
            except RobotBridgeError:
                pass

    def _close_now(self, reason: str):
        if self._closed:
            return
        with self._wlock:
            self._closed = True
        try:
            self.loop.selector.unregister(self.sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        for rej in self.decoder.close():
            self._reject(rej)
        logger.info("OpenIGTLink connection %s closed: %s", self.peer, reason)
        if self.on_close is not None:
            try:
                self.on_close(self, reason)
            except Exception:
                logger.exception("on_close callback failed")


def _match(message: IgtlMessage, match) -> bool:
    if match is None:
        return True
    if callable(match):
        return bool(match(message))
    type_name, device = match
    return (type_name is None or message.type_name == type_name) and (device is None or message.device_name == device)


class Inbox:
    """Thread-safe store of received messages; ``get`` waits (Condition, no polling) for a match.

    ``match`` is None (any), a callable ``message -> bool`` or a ``(type_name, device_name)`` pair where
    either may be None.
    """

    def __init__(self, maxlen: int = 100000, counter=None):
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self.maxlen = maxlen
        self.dropped = 0
        self._counter = counter if counter is not None else itertools.count(1)
        self.last_seq = 0

    def put(self, message: IgtlMessage):
        """Store a message; it gets ``arrival_seq``, increasing in arrival order (shared by inboxes built with
        the same ``counter``), so a reply can be tied to what it answers."""
        with self._cond:
            self.last_seq = message.arrival_seq = next(self._counter)
            if len(self._items) >= self.maxlen:
                self._items.popleft()
                self.dropped += 1
            self._items.append(message)
            self._cond.notify_all()

    def get(self, match=None, timeout: float = 1.0, abort: Callable | None = None) -> IgtlMessage | None:
        """First message matching ``match``; None after ``timeout`` s or as soon as ``abort()`` is true."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                for i, m in enumerate(self._items):
                    if _match(m, match):
                        del self._items[i]
                        return m
                if abort is not None and abort():
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def discard(self, match) -> int:
        with self._cond:
            keep = [m for m in self._items if not _match(m, match)]
            n = len(self._items) - len(keep)
            self._items = collections.deque(keep)
            return n

    def wake(self):
        with self._cond:
            self._cond.notify_all()

    def __len__(self):
        return len(self._items)


class IgtlServer:
    """Accepts any number of OpenIGTLink clients. ``port=0`` picks a free port (see ``.port``).

    Callbacks (all optional, run in the loop thread): ``on_message(conn, msg)``, ``on_connect(conn)``,
    ``on_disconnect(conn, reason)``, ``on_reject(conn, rejection)``.

    At most ``max_connections`` clients at once (a further client gets a STATUS ``REJECTED``
    RESOURCE_ERROR and is closed); a client with no traffic either way for ``idle_timeout_s`` seconds is
    closed (None: never), so an observer that only listens stays connected while there is something to
    watch. When the process runs out of descriptors the listening socket pauses instead of spinning.
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1", *, on_message=None, on_connect=None,
                 on_disconnect=None, on_reject=None, on_sent=None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 report_rejections: bool = True, name: str = "igtl-server",
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S):
        self.on_message = on_message
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.on_reject = on_reject
        self.on_sent = on_sent
        self.max_body_bytes = max_body_bytes
        self.report_rejections = report_rejections
        self.max_connections = max(1, int(max_connections))
        self.idle_timeout_s = None if idle_timeout_s is None else float(idle_timeout_s)
        self.refused_connections = 0
        self.idle_closed = 0
        self.accept_pauses = 0
        self.connections: list[Connection] = []
        self.rejections: list[Rejection] = []
        self._accept_paused = False
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._lsock.bind((host, port))
        except OSError as exc:
            self._lsock.close()
            raise RobotBridgeError(f"Cannot listen on {host}:{port} ({exc}); choose another port.") from exc
        self._lsock.listen(8)
        self._lsock.setblocking(False)
        self.host = host
        self.port = self._lsock.getsockname()[1]
        self.loop = EventLoop(name)
        self.loop.run_sync(lambda: self.loop.selector.register(self._lsock, selectors.EVENT_READ, self._on_accept))
        if self.idle_timeout_s is not None:
            self.loop.call_later(min(self.idle_timeout_s, 5.0), self._check_idle)
        logger.info("OpenIGTLink server listening on %s:%d", host, self.port)

    def _check_idle(self):
        if self._lsock.fileno() < 0:
            return
        now = time.monotonic()
        for conn in list(self.connections):
            if now - conn.last_activity > self.idle_timeout_s:
                self.idle_closed += 1
                conn._close_now(f"idle for more than {self.idle_timeout_s:g} s")
        self.loop.call_later(min(self.idle_timeout_s, 5.0), self._check_idle)

    def _pause_accept(self, delay_s: float = 0.2):
        """Out of descriptors: stop watching the listening socket for a moment instead of spinning."""
        if self._accept_paused:
            return
        self._accept_paused = True
        self.accept_pauses += 1
        try:
            self.loop.selector.unregister(self._lsock)
        except (KeyError, ValueError, OSError):
            pass

        def resume():
            self._accept_paused = False
            if self._lsock.fileno() >= 0:
                try:
                    self.loop.selector.register(self._lsock, selectors.EVENT_READ, self._on_accept)
                except (KeyError, ValueError, OSError):
                    pass

        self.loop.call_later(delay_s, resume)

    def _on_accept(self, _mask):
        for _ in range(64):
            try:
                sock, _addr = self._lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("OpenIGTLink server cannot accept a client (%s); pausing new connections", exc)
                self._pause_accept()
                return
            if len(self.connections) >= self.max_connections:
                self.refused_connections += 1
                if self.refused_connections <= MAX_LOGGED_REJECTIONS:
                    logger.warning("OpenIGTLink server refuses a client: %d connections already open",
                                   len(self.connections))
                try:
                    sock.setblocking(False)
                    sock.send(StatusMessage("REJECTED", code=StatusCode.RESOURCE_ERROR, error_name="too_many_clients",
                                            status_string=f"at most {self.max_connections} clients").pack())
                except OSError:
                    pass
                sock.close()
                continue
            self._accept(sock)

    def _accept(self, sock):
        conn = Connection(self.loop, sock, max_body_bytes=self.max_body_bytes, on_message=self._message,
                          on_reject=self._reject, on_close=self._closed, on_sent=self.on_sent,
                          report_rejections=self.report_rejections)
        self.connections.append(conn)
        logger.info("OpenIGTLink client connected from %s", conn.peer)
        if self.on_connect is not None:
            self.on_connect(conn)

    def _message(self, conn, msg):
        if self.on_message is not None:
            self.on_message(conn, msg)

    def _reject(self, conn, rej):
        self.rejections.append(rej)
        del self.rejections[:-MAX_KEPT_REJECTIONS]
        if self.on_reject is not None:
            self.on_reject(conn, rej)

    def _closed(self, conn, reason):
        if conn in self.connections:
            self.connections.remove(conn)
        if self.on_disconnect is not None:
            self.on_disconnect(conn, reason)

    def broadcast(self, message: IgtlMessage):
        for conn in list(self.connections):
            try:
                conn.send(message)
            except RobotBridgeError:
                pass

    def drop_connections(self, reason: str = "dropped by server"):
        for conn in list(self.connections):
            conn.close(reason)

    def stop(self):
        try:
            self.loop.run_sync(self._stop_now)
        except RobotBridgeError:
            pass
        self.loop.stop()

    def _stop_now(self):
        for conn in list(self.connections):
            conn._close_now("server stopped")
        try:
            self.loop.selector.unregister(self._lsock)
        except (KeyError, ValueError):
            pass
        self._lsock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class IgtlClient:
    """Connects to an OpenIGTLink server. Without ``on_message`` received messages go to ``.inbox``.

    ``connect()`` may be called again after a disconnect (the loop thread is reused).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 18944, *, on_message=None, on_reject=None,
                 on_disconnect=None, on_sent=None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 report_rejections: bool = False, name: str = "igtl-client"):
        self.host = host
        self.port = int(port)
        self.inbox = Inbox()
        self.on_message = on_message
        self.on_reject = on_reject
        self.on_disconnect = on_disconnect
        self.on_sent = on_sent
        self.max_body_bytes = max_body_bytes
        self.report_rejections = report_rejections
        self.rejections: list[Rejection] = []
        self.connection: Connection | None = None
        self.loop = EventLoop(name)
        self._closed = False

    @property
    def connected(self) -> bool:
        return self.connection is not None and self.connection.connected

    def connect(self, timeout: float = 3.0):
        if self._closed:
            raise RobotBridgeError("This OpenIGTLink client was closed; create a new one.")
        if self.connected:
            return
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as exc:
            raise RobotBridgeError(
                f"Cannot connect to the robot at {self.host}:{self.port} ({exc}); check that it is running "
                "and the address is right.") from exc
        self.connection = Connection(self.loop, sock, max_body_bytes=self.max_body_bytes,
                                     on_message=self._message, on_reject=self._reject, on_close=self._closed_cb,
                                     on_sent=self.on_sent, report_rejections=self.report_rejections)
        logger.info("Connected to OpenIGTLink server %s:%d", self.host, self.port)

    def _message(self, conn, msg):
        if self.on_message is not None:
            self.on_message(conn, msg)
        else:
            self.inbox.put(msg)

    def _reject(self, conn, rej):
        self.rejections.append(rej)
        del self.rejections[:-MAX_KEPT_REJECTIONS]
        if self.on_reject is not None:
            self.on_reject(conn, rej)

    def _closed_cb(self, conn, reason):
        self.inbox.wake()
        if self.on_disconnect is not None:
            self.on_disconnect(conn, reason)

    def send(self, message: IgtlMessage):
        if not self.connected:
            raise RobotBridgeError(f"Not connected to the robot at {self.host}:{self.port}; reconnect and retry.")
        self.connection.send(message)

    def send_bytes(self, data: bytes):
        if not self.connected:
            raise RobotBridgeError(f"Not connected to the robot at {self.host}:{self.port}; reconnect and retry.")
        self.connection.send_bytes(data)

    def receive(self, match=None, timeout: float = 1.0, abort_on_disconnect: bool = False) -> IgtlMessage | None:
        """Next received message matching ``match`` (see :class:`Inbox`), or None after ``timeout`` s
        (or at once when the connection drops and ``abort_on_disconnect`` is set)."""
        abort = (lambda: not self.connected) if abort_on_disconnect else None
        return self.inbox.get(match, timeout, abort)

    def disconnect(self, reason: str = "closed locally"):
        if self.connection is not None:
            self.connection.close(reason)

    def close(self):
        self.disconnect()
        self._closed = True
        self.loop.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
