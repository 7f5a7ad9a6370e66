"""A minimal headless-Chromium driver for the report's browser test: the Chrome DevTools protocol over
``--remote-debugging-pipe``, standard library only.

Why the pipe: no port to pick or to race for, no websocket library, and the browser exits with the pipe.
Chromium reads NUL-terminated JSON commands on file descriptor 3 and writes NUL-terminated JSON replies and
events on file descriptor 4; a tiny Python trampoline moves the two pipe ends onto 3 and 4 before it execs the
browser. Every page load is checked through the protocol itself: console messages and uncaught exceptions
(``Runtime``), browser log entries such as failed resource loads (``Log``), then a script measures the page
and ``Page.captureScreenshot`` keeps a full-page PNG.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: The Debian package's command names, in the order they are tried.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_TRAMPOLINE = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
               "os.execv(sys.argv[3], sys.argv[3:])")

#: What the page is asked after loading (returned by value): images, horizontal overflow, the base font.
MEASURE_JS = """(() => {
  const imgs = Array.from(document.images).map(i => ({alt: i.alt.slice(0, 60), complete: i.complete,
      naturalWidth: i.naturalWidth, width: i.getBoundingClientRect().width}));
  const de = document.documentElement;
  const wide = Array.from(document.body.querySelectorAll('*')).filter(e => e.getBoundingClientRect().right >
      de.clientWidth + 1 && !e.closest('.table-scroll')).slice(0, 5).map(e => e.tagName + '.' + e.className);
  return {innerWidth: window.innerWidth, clientWidth: de.clientWidth, scrollWidth: de.scrollWidth,
          bodyFontPx: parseFloat(getComputedStyle(document.body).fontSize),
          minTextPx: Math.min(...Array.from(document.body.querySelectorAll('p,td,th,li,figcaption'))
              .map(e => parseFloat(getComputedStyle(e).fontSize))),
          viewportMeta: !!document.querySelector('meta[name=viewport]'), images: imgs, overflowing: wide};
})()"""


def find_chromium() -> str | None:
    """Path of a Chromium executable, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class ChromiumError(RuntimeError):
    pass


class HeadlessChromium:
    """One headless browser; :meth:`check_page` loads a file at a window width and reports what it saw."""

    def __init__(self, executable: str, timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        self._profile = tempfile.mkdtemp(prefix="smartbiopsy-chromium-")
        cmd_r, cmd_w = os.pipe()   # we write commands, the browser reads them on fd 3
        res_r, res_w = os.pipe()   # the browser writes on fd 4, we read
        # keep the browser's ends away from 3 and 4 so that the trampoline's dup2 calls cannot collide
        child_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)
        child_w = fcntl.fcntl(res_w, fcntl.F_DUPFD, 10)
        os.close(cmd_r)
        os.close(res_w)
        args = [sys.executable, "-c", _TRAMPOLINE, str(child_r), str(child_w), executable,
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
                f"--user-data-dir={self._profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(args, pass_fds=(child_r, child_w), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(child_r)
        os.close(child_w)
        self._w, self._r = cmd_w, res_r
        self._buf = b""
        self._next_id = 0
        self._events: list[dict] = []

    # --- protocol -------------------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChromiumError("headless Chromium did not answer in time")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise ChromiumError(f"headless Chromium closed the pipe (exit code {self.proc.poll()})")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        mid = self._next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            m = self._read_message(deadline)
            if m.get("id") == mid:
                if "error" in m:
                    raise ChromiumError(f"{method}: {m['error']}")
                return m.get("result", {})
            self._events.append(m)

    def wait_event(self, method: str, session: str, timeout_s: float | None = None) -> dict:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            for i, e in enumerate(self._events):
                if e.get("method") == method and e.get("sessionId") == session:
                    return self._events.pop(i)
            self._events.append(self._read_message(deadline))

    # --- one page -------------------------------------------------------------------------------------
    def check_page(self, path: Path, width: int, height: int = 1000, screenshot: Path | None = None) -> dict:
        """Open ``path`` in a fresh tab with a ``width`` x ``height`` CSS-pixel window; return the page
        measurements of :data:`MEASURE_JS` plus ``errors`` (console errors, exceptions, browser log errors) and
        write a full-page screenshot to ``screenshot`` when given."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self._events.clear()
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)
        self.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=session)
        self.wait_event("Page.loadEventFired", session)
        out = self.send("Runtime.evaluate", {"expression": MEASURE_JS, "returnByValue": True},
                        session=session)["result"]["value"]
        errors = []
        for e in self._events:
            if e.get("sessionId") != session:
                continue
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                errors.append("exception: " + str(p.get("exceptionDetails", {}).get("text")))
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append("log: " + str(p["entry"].get("text")))
        out["errors"] = errors
        if screenshot is not None:
            shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                             session=session)
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        self.send("Target.closeTarget", {"targetId": target})
        return out

    def close(self):
        try:
            self.send("Browser.close")
        except (ChromiumError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
