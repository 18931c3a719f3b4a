"""The report in a real browser: headless Chromium loads report.html from disk, every image must
decode and the page must log no console error (a blocked fetch, a CSP violation or a broken
image all log one). Driven over the DevTools protocol with a minimal stdlib WebSocket client.

Needs Debian's `chromium` package (`apt-get install -y chromium`); skipped only when
/usr/bin/chromium is missing.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from report_fixtures import make_bundle

from edge_build.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
)
TIMEOUT_S = 60.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium missing: apt-get install -y chromium"),
]


class WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol: text frames, client-side masking."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode("ascii")
        )
        self.reader = self.sock.makefile("rb")
        status = self.reader.readline().decode("latin-1")
        if " 101 " not in status:
            raise RuntimeError(f"DevTools WebSocket handshake refused: {status.strip()}")
        while self.reader.readline() not in (b"\r\n", b""):
            pass

    def send(self, text: str) -> None:
        payload = text.encode("utf-8")
        header = bytearray([0x81])
        if len(payload) < 126:
            header.append(0x80 | len(payload))
        elif len(payload) < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(payload))
        mask = os.urandom(4)
        self.sock.sendall(bytes(header) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _exactly(self, count: int) -> bytes:
        data = self.reader.read(count)
        if data is None or len(data) != count:
            raise ConnectionError("DevTools connection closed")
        return data

    def receive(self) -> str:
        message = b""
        while True:
            first, second = self._exactly(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._exactly(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._exactly(8))[0]
            payload = self._exactly(length)
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools connection closed by the browser")
            if opcode == 0x9:  # ping: the server expects a pong (masked like every client frame)
                mask = os.urandom(4)
                self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + mask + payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if first & 0x80:
                    return message.decode("utf-8")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class DevTools:
    """One page target: `call` waits for its reply; every event seen is kept in `events`."""

    def __init__(self, socket_: WebSocket) -> None:
        self.ws = socket_
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.receive())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for(self, event: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for seen in self.events:
            if seen["method"] == event:
                return seen
        while time.monotonic() < deadline:
            message = json.loads(self.ws.receive())
            if "method" in message:
                self.events.append(message)
                if message["method"] == event:
                    return message
        raise TimeoutError(f"no {event} within {timeout} s")


@contextlib.contextmanager
def chromium() -> Iterator[DevTools]:
    """A fresh headless Chromium (own profile directory) with one blank page, over DevTools."""
    scratch = Path(tempfile.mkdtemp(prefix="edge-build-chromium-"))
    profile, log = scratch / "profile", scratch / "chromium.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    sockets: list[WebSocket] = []
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + TIMEOUT_S
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            if process.poll() is not None:
                raise RuntimeError(f"chromium exited ({process.returncode}): {log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port_text, browser_path = port_file.read_text().splitlines()[:2]
        sockets.append(WebSocket(int(port_text), browser_path))
        target = DevTools(sockets[0]).call("Target.createTarget", url="about:blank")["targetId"]
        sockets.append(WebSocket(int(port_text), f"/devtools/page/{target}"))
        yield DevTools(sockets[1])
    finally:
        for ws in sockets:
            ws.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(scratch, ignore_errors=True)


_IMAGE_CHECK = """
Promise.all(Array.from(document.images).map(img =>
  img.decode().then(() => true, () => false).then(decoded => ({
    alt: img.alt, decoded, width: img.naturalWidth, height: img.naturalHeight, src: img.src.slice(0, 30)}))))
"""


def open_page(devtools: DevTools, path: Path, screenshot: Path | None = None) -> dict[str, Any]:
    """Load `path`; return its images' decode results, console errors and page facts."""
    for domain in ("Page", "Runtime", "Log"):
        devtools.call(f"{domain}.enable")
    devtools.events.clear()
    devtools.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
    devtools.call("Page.navigate", url=path.resolve().as_uri())
    devtools.wait_for("Page.loadEventFired")
    images = devtools.call("Runtime.evaluate", expression=_IMAGE_CHECK, awaitPromise=True, returnByValue=True)
    facts = devtools.call(
        "Runtime.evaluate",
        expression="({title: document.title, height: document.documentElement.scrollHeight,"
        " sections: document.querySelectorAll('section').length, text: document.body.innerText})",
        returnByValue=True,
    )["result"]["value"]
    if screenshot is not None:
        shot = devtools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    devtools.call("Runtime.evaluate", expression="1")  # drain events logged while measuring
    errors = []
    for event in devtools.events:
        params = event.get("params", {})
        if event["method"] == "Runtime.exceptionThrown":
            errors.append(params.get("exceptionDetails", {}).get("text", "exception"))
        elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif event["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            errors.append(
                f"{params['entry'].get('source')}: {params['entry'].get('text')} {params['entry'].get('url', '')}"
            )
    return {"images": images["result"]["value"], "errors": errors, **facts}


def test_report_renders_in_chromium_with_every_image_decoded(tmp_path):
    paths = make_bundle(tmp_path, int8_fails=True)
    html_path, _ = write_report(
        paths["bundle"],
        data_dir=paths["data"],
        history_dir=paths["history"],
        failure={"stage": "bench", "message": "ort_int8 p50 over budget", "hint": "see the latency section"},
    )
    bad = tmp_path / "broken.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><img alt="broken" src="data:image/png;base64,iVBORw0KGgoAAAAN">'
        '<img alt="remote" src="http://127.0.0.1:9/x.png"></body></html>',
        encoding="utf-8",
    )
    screenshot = Path(os.environ.get("EDGE_BUILD_REPORT_SCREENSHOT") or tmp_path / "report.png")
    with chromium() as devtools:
        page = open_page(devtools, html_path, screenshot)
        control = open_page(devtools, bad)

    # The checker itself: a corrupt data URI and an unreachable image must both be caught.
    assert [img["decoded"] for img in control["images"]] == [False, False]
    assert control["errors"], "a failed image load must log a console error"

    assert page["errors"] == []
    assert page["title"] == "edge-build report — lite"
    assert page["sections"] == 6
    # plots (LR, loss, per-class, latency bars, history) + 5 misclassified thumbnails
    assert len(page["images"]) >= 10
    broken = [img for img in page["images"] if not (img["decoded"] and img["width"] > 0 and img["height"] > 0)]
    assert broken == []
    for words in ("Build failed at stage", "plastic bottle", "塑料瓶", "Regressions in the history", "FAIL"):
        assert words in page["text"]
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width == 1280 and height == page["height"] > 2000
