"""Headless Chromium driven over the DevTools protocol, as a person uses the Prefect UI.

`harness.chromium_text` reads a page once (`--dump-dom`); a test that clicks Run, fills
a form or presses Retry needs a live page instead. This is the same Debian Chromium,
started with `--remote-debugging-port` and spoken to over its WebSocket (the `websockets`
package Prefect already depends on): navigate, read the rendered text, click where a
person would (real mouse events at the element's centre, so menus that open on
pointerdown open), type, and keep a screenshot of every step.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from tests.e2e.harness import CHROMIUM

# What a person's laptop shows: wide enough for the run page's side panel.
WINDOW = (1440, 1000)

# Finds the innermost visible element whose own text (or aria-label) matches, preferring
# buttons, links, tabs and menu items: what a person would click for that label.
_FIND = """
(([pattern, flags, scope]) => {
  const re = new RegExp(pattern, flags);
  const root = scope ? document.querySelector(scope) : document;
  if (!root) return null;
  const visible = (el) => {
    const r = el.getBoundingClientRect();
    const s = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none';
  };
  const label = (el) => (el.getAttribute('aria-label') || el.innerText || el.value || '').trim();
  const clickable = 'button, a, [role=button], [role=tab], [role=menuitem], [role=option], '
    + 'label, summary, [role=link]';
  const matches = (el) => visible(el) && re.test(label(el));
  let found = [...root.querySelectorAll(clickable)].filter(matches);
  if (!found.length) {
    found = [...root.querySelectorAll('body *')].filter(
      (el) => matches(el) && ![...el.children].some((c) => re.test(label(c))));
  }
  if (!found.length) return null;
  found.sort((a, b) => label(a).length - label(b).length);
  const el = found[0];
  el.scrollIntoView({block: 'center', inline: 'center'});
  const r = el.getBoundingClientRect();
  return {x: r.left + r.width / 2, y: r.top + r.height / 2, text: label(el).slice(0, 200)};
})
"""


# The input of a parameter in Prefect's Custom run form, found by the parameter's name.
_PARAMETER = """
(([name]) => {
  const property = [...document.querySelectorAll('.schema-form-property')].find((p) => {
    const label = p.querySelector('.schema-form-property__label');
    return label && label.innerText.trim().split(' ')[0] === name;
  });
  const input = property && property.querySelector('input, textarea, select');
  if (!input) return null;
  input.scrollIntoView({block: 'center'});
  const r = input.getBoundingClientRect();
  return {x: r.left + 12, y: r.top + r.height / 2, type: input.type};
})
"""


class Browser:
    """One headless Chromium with one tab; screenshots go to `shots` as NN-name.png."""

    def __init__(self, profile: Path, shots: Path) -> None:
        self.profile, self.shots = profile, shots
        profile.mkdir(parents=True, exist_ok=True)
        shots.mkdir(parents=True, exist_ok=True)
        self._ids = itertools.count(1)
        self._shot_no = itertools.count(1)
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: ClientConnection | None = None
        # The page's requests that failed or were answered 4xx/5xx, oldest first: what a
        # timeout message shows, since the UI's own toast only says "Something went wrong".
        self.failed_requests: list[str] = []
        self._urls: dict[str, str] = {}

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        port_file = self.profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        args = [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            f"--user-data-dir={self.profile}",
            "--remote-debugging-port=0",
            "--remote-allow-origins=*",
            "about:blank",
        ]
        log = (self.profile / "chromium.log").open("wb")
        self._proc = subprocess.Popen(
            args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"chromium did not start: see {self.profile / 'chromium.log'}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Network.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
        )

    def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(10)

    # --- the protocol ---------------------------------------------------------------------

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 60) -> Any:
        assert self._ws is not None, "start() first"
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"chromium did not answer {method} in {timeout:.0f}s")
            message = json.loads(self._ws.recv(timeout=left))
            if "method" in message:
                self._event(message["method"], message.get("params", {}))
                continue
            if message.get("id") != call_id:
                continue  # the answer to an earlier call that timed out
            if "error" in message:
                raise AssertionError(f"{method}: {message['error']}")
            return message.get("result", {})

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Network.requestWillBeSent":
            request = params.get("request", {})
            what = f"{request.get('method')} {request.get('url')}"
            self._urls[params.get("requestId", "")] = what
        elif method == "Network.responseReceived":
            response = params.get("response", {})
            if int(response.get("status") or 0) >= 400:
                what = self._urls.get(params.get("requestId", ""), response.get("url"))
                self.failed_requests.append(f"{what}: {response.get('status')}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            what = self._urls.get(params.get("requestId", ""), "a request")
            self.failed_requests.append(f"{what}: {params.get('errorText')}")

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    # --- what a person does ---------------------------------------------------------------

    def goto(self, url: str, timeout: float = 60) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait(
            f"{url} to load",
            lambda: self.evaluate("document.readyState") == "complete",
            timeout,
        )

    def text(self) -> str:
        """The page's rendered text, one line per block, as a person reads it."""
        return str(self.evaluate("document.body ? document.body.innerText : ''") or "")

    def wait(self, what: str, check: Any, timeout: float = 60, interval: float = 0.25) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                shot = self.screenshot(f"timeout-{_slug(what)}")
                failed = "\n".join(self.failed_requests[-20:]) or "none"
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what} (screenshot {shot})\n"
                    f"--- requests that failed ---\n{failed}\n"
                    f"--- page text ---\n{self.text()[-3000:]}"
                )
            time.sleep(interval)

    def wait_text(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """Until the rendered text matches `pattern` (a regular expression)."""
        regex = re.compile(pattern)
        return self.wait(f"text /{pattern}/", lambda: regex.search(self.text()), timeout)

    def find(self, pattern: str, scope: str | None = None) -> dict[str, Any] | None:
        found = self.evaluate(f"{_FIND}({json.dumps([pattern, 'i', scope])})")
        return found if isinstance(found, dict) else None

    def scroll_to(self, pattern: str, timeout: float = 30) -> None:
        """Bring the element showing `pattern` into view (for the next screenshot)."""
        self.wait(f"something showing /{pattern}/", lambda: self.find(pattern), timeout)

    def click(self, pattern: str, *, scope: str | None = None, timeout: float = 30) -> str:
        """Click the element labelled `pattern` (a regular expression); its label back."""
        spot = self.wait(
            f"something to click labelled /{pattern}/", lambda: self.find(pattern, scope), timeout
        )
        x, y = spot["x"], spot["y"]
        self.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )
        return str(spot["text"])

    def type_text(self, text: str) -> None:
        """Type into the focused field, as the keyboard would."""
        self.call("Input.insertText", {"text": text})

    def press_keys(self, keys: str) -> None:
        """Key by key (a native date field takes its digits this way, not pasted)."""
        for key in keys:
            self.call("Input.dispatchKeyEvent", {"type": "keyDown", "text": key, "key": key})
            self.call("Input.dispatchKeyEvent", {"type": "keyUp", "key": key})

    def parameter(self, name: str) -> dict[str, Any]:
        """Where the Custom run form's field for parameter `name` is, and its input type."""
        return self.wait(
            f"the form field of parameter {name}",
            lambda: self.evaluate(f"{_PARAMETER}({json.dumps([name])})"),
            timeout=30,
        )

    def fill_parameter(self, name: str, value: str) -> None:
        """Click into the parameter's field and type `value`: a date as mmddyyyy digits,
        as a person types it into the browser's date field."""
        field = self.parameter(name)
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": field["x"], "y": field["y"], "button": "left", "clickCount": 1},
            )
        if field["type"] == "date":
            self.press_keys(value)
        else:
            self.type_text(value)

    def screenshot(self, name: str) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path = self.shots / f"{next(self._shot_no):02d}-{_slug(name)}.png"
        path.write_bytes(base64.b64decode(data))
        return path


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "page"


@contextlib.contextmanager
def browser(profile: Path, shots: Path) -> Iterator[Browser]:
    b = Browser(profile, shots)
    try:
        b.start()
        yield b
    finally:
        b.close()
