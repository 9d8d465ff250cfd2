"""A minimal Chrome DevTools Protocol client: headless Chromium (Debian package) driven from Python, no npm.

Used by ``benchmarks/mlflow_screenshots.py``: open a page, wait for text to appear, click or type by visible text,
capture a PNG. Chromium runs with a fresh profile and everything that would reach the network disabled.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--disable-default-apps", "--mute-audio")


class Browser:
    """One headless Chromium with one page, controlled over the DevTools websocket.

    Args:
        executable: the Chromium binary (``apt-get install -y chromium``: ``/usr/bin/chromium``).
        width: viewport width in CSS pixels.
        height: viewport height in CSS pixels.
        port: remote-debugging port (0: pick a free one).
    """

    def __init__(self, executable: str = "/usr/bin/chromium", *, width: int = 1440, height: int = 900,
                 port: int = 9333) -> None:
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="lw-chromium-")
        self.proc = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", f"--remote-debugging-port={port}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ws_url = self._page_ws(port)
        self.ws = connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=30)
        self._ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def _page_ws(self, port: int, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"Chromium's DevTools did not answer on port {port}")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events received meanwhile are dropped)."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str) -> Any:
        """Evaluate JavaScript in the page and return its (JSON) value."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS failed: {res['exceptionDetails'].get('text')} in {expression[:120]}")
        return res.get("result", {}).get("value")

    def goto(self, url: str, *, wait_text: str | None = None, timeout_s: float = 90) -> None:
        """Load ``url`` afresh and wait until the page shows ``wait_text`` (and a moment more for late requests).

        A single-page app may not re-render when only the ``#`` part of its URL changes, so each page is loaded from a
        blank one.
        """
        self.call("Page.navigate", url="about:blank")
        time.sleep(0.3)
        self.call("Page.navigate", url=url)
        if wait_text:
            self.wait_text(wait_text, timeout_s)
        time.sleep(2.0)

    def wait_text(self, text: str, timeout_s: float = 90) -> None:
        """Wait until the page's visible text contains ``text``."""
        deadline = time.monotonic() + timeout_s
        needle = json.dumps(text)
        while time.monotonic() < deadline:
            if self.js(f"document.body && document.body.innerText.includes({needle})"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"{text!r} did not appear on the page")

    def click_text(self, text: str, selector: str = "button, a, [role=tab], [role=button], span, div") -> bool:
        """Click the smallest visible element matching ``selector`` whose text is exactly ``text``."""
        return bool(self.js(f"""(() => {{
            const els = [...document.querySelectorAll({json.dumps(selector)})]
              .filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)} && e.offsetParent !== null);
            els.sort((a, b) => a.innerText.length - b.innerText.length || a.contains(b) - b.contains(a));
            const el = els[els.length - 1];
            if (!el) return false;
            el.scrollIntoView({{block: 'center'}}); el.click(); return true; }})()"""))

    def click(self, selector: str | None = None, *, text: str | None = None) -> bool:
        """Click like a user: mouse events at the centre of ``selector``'s element, or of the last element with ``text``.

        Menus that open on pointer events (Radix) need this rather than ``element.click()``.
        """
        find = (f"document.querySelector({json.dumps(selector)})" if selector else
                f"""[...document.querySelectorAll('*')].filter(e => e.offsetParent !== null && e.innerText
                    && e.innerText.trim() === {json.dumps(text)}).pop()""")
        box = self.js(f"""(() => {{ const e = {find}; if (!e) return null; e.scrollIntoView({{block: 'center'}});
            const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        if not box:
            return False
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
        time.sleep(1.0)
        return True

    def resize(self, width: int, height: int) -> None:
        """Set the viewport (CSS pixels)."""
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        time.sleep(1.0)

    def screenshot(self, path: str | Path, *, full_height: int | None = None) -> Path:
        """Capture the viewport (or ``full_height`` CSS pixels from the top) as a PNG."""
        params: dict[str, Any] = {"format": "png"}
        if full_height:
            width = self.js("window.innerWidth")
            params |= {"clip": {"x": 0, "y": 0, "width": width, "height": full_height, "scale": 1},
                       "captureBeyondViewport": True}
        data = self.call("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        """Stop Chromium and remove its profile."""
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)
