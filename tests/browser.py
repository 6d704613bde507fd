"""A real headless Chromium for tests of the report page, driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages ended by a NUL byte on file descriptors 3 and 4), so no client library
is needed. Debian's ``chromium`` package (``.ci/run`` installs it); without it the tests skip and say why.

    python tests/browser.py results/report.html screenshot.png   # the first screen, 1400 x 900
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
from dataclasses import dataclass, field
from pathlib import Path

# Chromium as root in a container: no sandbox; nothing that reaches the network or runs in the background
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--remote-debugging-pipe"]
# every <img>: has it loaded, and how wide is the decoded image (0 when it failed)
IMAGES_JS = ("JSON.stringify(Array.from(document.images).map(i => ({alt: i.alt.slice(0, 60), complete: i.complete, "
             "width: i.naturalWidth})))")


def executable() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def skip_reason() -> str | None:
    if executable() is None:
        return "no Chromium on PATH (Debian package chromium; .ci/run installs it with apt-get as root)"
    return None


@dataclass
class Page:
    """What loading a page gave: every image's state, every error the console or the page reported, values of
    the expressions asked for, and a PNG of the first screen."""
    images: list[dict]
    errors: list[str]
    values: dict = field(default_factory=dict)
    screenshot: bytes = b""


class Chromium:
    def __init__(self, timeout: float = 60.0):
        self.timeout, self.next_id, self.events, self.buffer = timeout, 0, [], b""
        self.profile = tempfile.mkdtemp(prefix="shapo-chromium-")  # a fresh profile every time
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()
        # fds 3 and 4 of the child are the protocol's pipe: move ours above them first, so that setting 3 cannot
        # close the one that becomes 4
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]
        os.close(to_child)
        os.close(from_child)
        # a tiny exec wrapper places them (sh's dash cannot name a descriptor above 9)
        place = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); os.execv(sys.argv[3], sys.argv[3:])"
        command = [sys.executable, "-c", place, *map(str, high), executable(), *FLAGS,
                   f"--user-data-dir={self.profile}", "about:blank"]
        self.proc = subprocess.Popen(command, pass_fds=high, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for fd in high:
            os.close(fd)

    # ------------------------------------------------------------------------------------------- protocol
    def _message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer within {self.timeout} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe: {self.proc.stderr.read().decode()[-2000:]}")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, event: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            found = next((e for e in self.events if e.get("method") == event), None)
            if found:
                self.events.remove(found)
                return found
            self.events.append(self._message(deadline))

    # ------------------------------------------------------------------------------------------------ use
    def load(self, path: Path, width: int = 1400, height: int = 900, expressions: dict | None = None) -> Page:
        """Open ``path`` in a new tab of ``width`` x ``height``, wait for its load event, and report."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session)
        self.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session)
        self.wait_for("Page.loadEventFired")

        def evaluate(expression):
            reply = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
            if "exceptionDetails" in reply:
                raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
            return reply["result"].get("value")

        images = json.loads(evaluate(IMAGES_JS))
        values = {name: evaluate(js) for name, js in (expressions or {}).items()}
        shot = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"}, session)["data"])
        return Page(images, self.errors(), values, shot)

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (a resource that failed to load) so far."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} ({p['entry'].get('url', '')})")
        return out

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._read, self._write):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    page_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    with Chromium() as browser:
        page = browser.load(page_path)
    out.write_bytes(page.screenshot)
    print(json.dumps({"images": page.images, "errors": page.errors}, indent=1))
