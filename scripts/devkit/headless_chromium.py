"""Headless Chromium driven over the Chrome DevTools protocol (a websocket; aiohttp, which ComfyUI needs anyway),
for checks of ComfyUI's real web frontend."""
import asyncio
import base64
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
import urllib.request

import aiohttp

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1600,1000", "--hide-scrollbars"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


class Chromium:
    """One headless browser with one page; `evaluate` runs JavaScript (awaiting promises), `screenshot` saves PNG."""

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="deltaconv_chromium_")
        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.loop = asyncio.new_event_loop()
        self.ids = itertools.count(1)
        self.ws = self.session = None
        self.loop.run_until_complete(self._connect(self._devtools_port()))

    def _devtools_port(self, timeout: float = 30) -> int:
        path = os.path.join(self.profile, "DevToolsActivePort")  # Chromium writes its chosen port here
        deadline = time.time() + timeout
        while time.time() < deadline:
            if os.path.exists(path) and pathlib.Path(path).read_text().strip():
                return int(pathlib.Path(path).read_text().split()[0])
            if self.proc.poll() is not None:
                raise RuntimeError(f"Chromium exited with {self.proc.returncode}")
            time.sleep(0.1)
        raise RuntimeError("Chromium did not open its DevTools port")

    async def _connect(self, port: int):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def _send(self, method: str, params: dict, timeout: float):
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.receive_json()
                if msg.get("id") == msg_id:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg["result"]

    def send(self, method: str, params: dict | None = None, timeout: float = 60):
        return self.loop.run_until_complete(self._send(method, params or {}, timeout))

    def evaluate(self, expression: str, timeout: float = 60):
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {json.dumps(result['exceptionDetails'])[:2000]}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if value := self.evaluate(expression):
                return value
            time.sleep(0.25)
        raise TimeoutError(f"not true after {timeout}s: {expression}")

    def navigate(self, url: str):
        self.send("Page.navigate", {"url": url})

    def set_viewport(self, size: tuple[int, int] | None):
        """The page as if on a screen of `size` CSS pixels (scale 1); None: back to the window's own size."""
        if size is None:
            self.send("Emulation.clearDeviceMetricsOverride")
        else:
            self.send("Emulation.setDeviceMetricsOverride", {"width": size[0], "height": size[1],
                                                             "deviceScaleFactor": 1, "mobile": False})

    def screenshot(self, path: str):
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        if self.session:
            self.loop.run_until_complete(self.ws.close())
            self.loop.run_until_complete(self.session.close())
        self.loop.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)
