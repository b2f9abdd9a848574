"""A headless Chromium driven through chromedriver's W3C WebDriver HTTP API, standard library only (no selenium)."""
from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.request

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) paths, or None when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


class Browser:
    def __init__(self, url: str, session: str):
        self.url, self.session = url, session

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float = 60):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}/session/{self.session}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())["value"]

    def open(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self._call("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css: str, text: str) -> None:
        self._call("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self._call("POST", f"/element/{self.find(css)}/click", {})

    def run(self, script: str, *args):
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, timeout: float, *args):
        """Poll `script` until it returns something truthy; that value."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if value := self.run(script, *args):
                return value
            time.sleep(0.2)
        raise TimeoutError(f"the page never satisfied: {script}")

    def screenshot(self, path) -> None:
        with open(path, "wb") as f:
            f.write(base64.b64decode(self._call("GET", "/screenshot")))


@contextlib.contextmanager
def headless_chromium(browser: str, driver: str, width: int = 1100, height: int = 640):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):  # chromedriver listens within a second or two
            try:
                urllib.request.urlopen(url + "/status", timeout=2).read()
                break
            except OSError:
                time.sleep(0.1)
        options = {"binary": browser, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                               "--disable-dev-shm-usage", f"--window-size={width},{height}"]}
        body = json.dumps({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}})
        request = urllib.request.Request(url + "/session", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            session = json.loads(response.read())["value"]["sessionId"]
        page = Browser(url, session)
        try:
            yield page
        finally:
            urllib.request.urlopen(urllib.request.Request(f"{url}/session/{session}", method="DELETE"), timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
