"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``):
open a page, run JavaScript in it, take a full-page screenshot. It needs only a Chromium binary
(Debian's ``chromium`` package; ``CHROMIUM=/path`` picks another) and the standard library: no
browser download, no client package.

The browser reads JSON commands, each ended by a NUL byte, on its file descriptor 3 and writes
replies and events the same way on descriptor 4; ``os.posix_spawn`` wires two pipes there.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",  # CI containers run as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--allow-file-access-from-files",
    "--remote-debugging-pipe",
)


class BrowserError(RuntimeError):
    """The browser failed, answered with an error or did not answer in time."""


def find_chromium() -> str | None:
    """``$CHROMIUM`` if set, else the first of :data:`NAMES` on PATH."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next((found for name in NAMES if (found := shutil.which(name))), None)


def _high_fd(fd: int) -> int:
    """``fd`` moved to a descriptor ≥ 10 (so wiring the child's 3 and 4 cannot clobber it)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Chromium:
    """One headless browser with one tab of ``width`` × ``height`` CSS pixels. Use as a context
    manager; :meth:`open`, :meth:`evaluate`, :meth:`screenshot`."""

    def __init__(self, binary: str, width: int = 1280, height: int = 900, timeout: float = 60):
        self.width, self.height, self.timeout = width, height, timeout
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        self.log = Path(self._profile.name) / "stderr.log"
        child_in, self._send_fd = os.pipe()
        self._recv_fd, child_out = os.pipe()
        child_in, child_out = _high_fd(child_in), _high_fd(child_out)
        args = [
            binary,
            *FLAGS,
            f"--user-data-dir={self._profile.name}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        try:
            self.pid = os.posix_spawn(
                binary,
                args,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, child_in, 3),
                    (os.POSIX_SPAWN_DUP2, child_out, 4),
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 2, str(self.log), os.O_WRONLY | os.O_CREAT, 0o644),
                ],
            )
        finally:
            os.close(child_in)
            os.close(child_out)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable", session=True)
        self._viewport(width, height)

    # --- protocol ------------------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._recv_fd], [], [], left)[0]:
                raise BrowserError(f"no answer from Chromium in {self.timeout:g} s; {self._tail()}")
            chunk = os.read(self._recv_fd, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium closed the pipe; {self._tail()}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        """Send one command (to the tab with ``session``) and return its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._send_fd, data) :]
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") != self._next_id:
                if "method" in reply:
                    self._events.append(reply)
                continue
            if "error" in reply:
                raise BrowserError(f"{method}: {reply['error']}")
            return reply.get("result", {})

    def _wait_event(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            for k, event in enumerate(self._events):
                if event["method"] == method and event.get("sessionId") == self.session:
                    del self._events[: k + 1]
                    return event
            self._events.append(self._read_message(deadline))

    def _tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "stderr: " + (text[-800:].strip() or "(empty)")

    # --- pages ---------------------------------------------------------------------------

    def open(self, url: str, settle_s: float = 0.3) -> None:
        """Load ``url`` and wait for its load event and web fonts, then ``settle_s`` more (for
        scripts that lay out after load: MathJax, widgets)."""
        self._events.clear()
        result = self.call("Page.navigate", session=True, url=url)
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")
        self._wait_event("Page.loadEventFired")
        self.evaluate(
            "document.fonts.ready.then(() => new Promise(done => "
            f"setTimeout(done, {int(1000 * settle_s)})))"
        )

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate",
            session=True,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path | str) -> Path:
        """The whole page (not only the window) as a PNG at ``path``: the window is made as tall
        as the page for the picture (captureBeyondViewport lays the page out again at another
        width, which moves this theme's sidebars), then set back."""
        height = int(self.evaluate("document.documentElement.scrollHeight"))
        self._viewport(self.width, height)
        try:
            data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        finally:
            self._viewport(self.width, self.height)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def _viewport(self, width: int, height: int) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    # --- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (BrowserError, OSError):
            pass  # it may close the pipe before it answers
        if not self._exited(within_s=10):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self._send_fd)
        os.close(self._recv_fd)
        self._profile.cleanup()

    def _exited(self, within_s: float) -> bool:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
