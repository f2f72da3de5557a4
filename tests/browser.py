"""A headless Chromium driven over the Chrome DevTools Protocol, for the tests of the /playground page.

No browser-automation package: the system ``chromium`` (Debian's package; ``deploy/install.sh`` installs it
with the dev extras) is started with ``--remote-debugging-port`` and spoken to over one WebSocket with the
``websockets`` client that uvicorn[standard] already brings. ``find_chromium`` looks for it and, when it
is missing and this process may use apt-get, installs it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _which() -> str | None:
    env = os.environ.get("STEERSERVE_CHROMIUM")
    if env:
        return env
    return next((p for p in map(shutil.which, NAMES) if p), None)


def find_chromium() -> tuple[str | None, str]:
    """(path of a Chromium binary, or None with the reason none could be had). ``$STEERSERVE_CHROMIUM`` wins."""
    found = _which()
    if found:
        return found, ""
    apt = shutil.which("apt-get")
    if apt is None:
        return None, "no chromium on PATH and no apt-get to install it (set STEERSERVE_CHROMIUM)"
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if prefix is None:
        return None, "no chromium on PATH, and apt-get needs root (run deploy/install.sh with STEERSERVE_EXTRAS=dev)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "--no-install-recommends", "chromium"]):
        done = subprocess.run(prefix + cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return None, f"installing chromium failed: {' '.join(cmd[1:2])}: {done.stderr.strip()[-300:]}"
    found = _which()
    return (found, "") if found else (None, "apt-get installed chromium but it is not on PATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Page:
    """One tab of a headless Chromium; collects console errors and uncaught exceptions as they happen."""

    def __init__(self, binary: str, width: int = 1400, height: int = 1000, port: int = 0) -> None:
        self.stack = ExitStack()  # the WebSocket, closed in close()
        self.profile = tempfile.mkdtemp(prefix="steerserve-chromium-")
        self.log = open(Path(self.profile) / "stderr.log", "wb")  # a file, not a pipe nobody drains  # noqa: SIM115
        port = port or free_port()
        # --no-sandbox: the tests may run as root (containers), where Chromium's sandbox refuses to start.
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
             f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self.log)
        # The debugging port answers once the browser is up (DevToolsActivePort is not always written).
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                if any(t["type"] == "page" for t in targets):
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = (Path(self.profile) / "stderr.log").read_text(errors="replace")[-2000:]
                self.close()
                raise RuntimeError(f"chromium did not start: {err}")
            time.sleep(0.2)
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self.ws = self.stack.enter_context(connect(url, max_size=None, open_timeout=30))
        self.next_id = 0
        self.errors: list[str] = []  # console.error calls, uncaught exceptions, failed loads the browser logged
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method)
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _note(self, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                      for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            self.errors.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}")

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        """Send one CDP command and return its result (events seen meanwhile are noted)."""
        self.next_id += 1
        ident = self.next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))
            self._note(msg)

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """The value of a JS expression (promises awaited); a thrown error raises here."""
        out = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                        returnByValue=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression!r} threw: {out['exceptionDetails']}")
        return out.get("result", {}).get("value")

    def goto(self, url: str, timeout: float = 60) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && document.body.dataset.state === 'ready'", timeout)

    def wait_for(self, expression: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout} s for {expression}")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.stack.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)
