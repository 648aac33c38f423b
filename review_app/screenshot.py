"""A PNG of the review page, taken with headless Chromium (for docs and for a check that it renders).

    python -m review_app.screenshot --output runs/review.png [--base-url URL --model NAME]
        [--draft TEXT --section 市場動向 --month 2024-06 --fund NAME [--ask]] [--db URL]

Starts the page headless (``streamlit run --server.headless true``) on a free port, waits for its
health check, opens it in Debian's headless Chromium, waits (DevTools protocol) until the page's
script has finished, captures it and stops both again. ``--draft``
fills the inputs through the page's URL (``?draft=...``); ``--ask`` also presses "Ask LLM", so
the model's answer and the diffs are in the picture (the model server must be up). The PNG is
written to a temp file and renamed, so a failed run leaves no half-written image.

Chromium: ``apt-get install -y chromium`` (``make browser``); ``--chromium PATH`` for another build.
Japanese text needs a CJK font (``apt-get install -y fonts-ipafont-gothic``), else it shows as boxes.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from benchmarks.serve import free_port
from review_app.__main__ import app_environment, streamlit_command
from review_app.settings import Settings, add_arguments, from_args

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--disable-dev-shm-usage"]


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium binary: ``explicit``, else chromium / chromium-browser on PATH."""
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def png_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; ValueError if the file is not a PNG."""
    head = Path(path).read_bytes()[:24]
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path}: not a PNG file")
    return struct.unpack(">II", head[16:24])


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Block until Streamlit answers /_stcore/health; RuntimeError if it exits or times out."""
    url = f"http://127.0.0.1:{port}/_stcore/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"streamlit did not answer {url} within {timeout:g} s")


def page_url(port: int, draft: str | None = None, section: str | None = None, month: str | None = None,
             fund: str | None = None, ask: bool = False) -> str:
    """The page's URL; the inputs go in the query string (app.prefill_from_query reads them)."""
    q = {k: v for k, v in (("fund", fund), ("section", section), ("month", month), ("draft", draft)) if v}
    if ask and draft:
        q["ask"] = "1"
    return f"http://127.0.0.1:{port}/" + (("?" + urllib.parse.urlencode(q)) if q else "")


# Streamlit sets these on its root element; its own browser tests wait for them the same way.
READY_JS = """(() => {
  const app = document.querySelector('[data-testid="stApp"]');
  return !!app && app.getAttribute('data-test-connection-state') === 'CONNECTED'
    && app.getAttribute('data-test-script-state') === 'notRunning' && !!document.querySelector('h1');
})()"""


class DevTools:
    """The few Chrome DevTools Protocol calls needed here, over the page target's WebSocket
    (``websockets`` comes with Streamlit). Use as ``with DevTools(url) as page: page.call(...)``."""

    def __init__(self, ws_url: str):
        self.ws_url = ws_url
        self.n = 0

    def __enter__(self) -> "DevTools":
        from websockets.sync.client import connect
        self._conn = connect(self.ws_url, max_size=None, open_timeout=10)
        self.ws = self._conn.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._conn.__exit__(*exc)

    def call(self, method: str, timeout: float = 30.0, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:  # events arrive in between; only our answer matters
            msg = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"chromium {method}: {msg['error']}")
                return msg.get("result", {})


def _devtools_page(user_data_dir: Path, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> str:
    """The WebSocket URL of Chromium's first page (port from DevToolsActivePort)."""
    port_file = user_data_dir / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with status {proc.returncode}: "
                               f"{log.read_text(errors='replace')[-2000:]}")
        lines = port_file.read_text().split() if port_file.is_file() else []
        if lines:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{lines[0]}/json/list", timeout=5) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except (urllib.error.URLError, ConnectionError, ValueError):
                pass
        time.sleep(0.2)
    raise RuntimeError(f"chromium did not open its DevTools port within {timeout:g} s")


def _stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group of ``proc``, SIGKILL whatever is left after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        try:  # the browser is gone; give its helpers the same chance
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def take_screenshot(url: str, output: str | os.PathLike, chromium: str, width: int = 1400, height: int = 1000,
                    wait_s: float = 120.0, settle_s: float = 1.0, ready_js: str = READY_JS) -> Path:
    """Open ``url`` in headless Chromium, wait until the Streamlit script has finished (at most
    ``wait_s``; another page: its own ``ready_js`` expression, true when it is drawn), then write a
    ``width`` x ``height`` PNG to ``output`` (temp file, then rename).

    Not ``chromium --screenshot --virtual-time-budget``: a Streamlit page arrives over a WebSocket
    after the load event, which virtual time does not wait for, so that picture is an empty page."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # ignore_cleanup_errors: a Chromium helper process may still flush its cache into the profile
    # for a moment after the group is killed; a leftover temp dir must not fail the screenshot
    with tempfile.TemporaryDirectory(prefix="review-shot-", ignore_cleanup_errors=True) as tmp:
        profile = Path(tmp) / "profile"
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
               f"--window-size={width},{height}", "about:blank"]
        log = Path(tmp) / "chromium.log"  # a file, not a pipe: nobody reads it while we wait
        with open(log, "wb") as log_fh:
            # own process group: the renderer/GPU/utility helpers are stopped with the browser
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_fh, start_new_session=True)
        try:
            with DevTools(_devtools_page(profile, proc, log)) as page:
                page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                          mobile=False)
                page.call("Page.navigate", url=url)
                deadline = time.monotonic() + wait_s
                while not page.call("Runtime.evaluate", expression=ready_js,
                                    returnByValue=True)["result"].get("value"):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the page at {url} was not ready within {wait_s:g} s")
                    time.sleep(0.25)
                time.sleep(settle_s)  # fonts and the last layout pass
                data = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
        finally:
            _stop_group(proc)
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise RuntimeError("chromium returned something that is not a PNG")
    fd, part = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(part, 0o644)
        os.replace(part, out)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise
    return out


def screenshot(output: str | os.PathLike, settings: Settings, chromium: str, draft: str | None = None,
               section: str | None = None, month: str | None = None, fund: str | None = None, ask: bool = False,
               width: int = 1400, height: int = 1000, wait_s: float = 120.0, log: str | os.PathLike | None = None
               ) -> Path:
    """Start the page headless, screenshot it, stop it. ``log``: where Streamlit's output goes
    (default: discarded unless it fails, then its tail is in the error)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="review-app-") as tmp:
        log_path = Path(log) if log else Path(tmp) / "streamlit.log"
        with open(log_path, "w", encoding="utf-8") as log_fh:
            # toolbarMode viewer: no "Deploy" button in the picture
            proc = subprocess.Popen(streamlit_command(port, headless=True) + ["--server.fileWatcherType", "none",
                                                                              "--client.toolbarMode", "viewer"],
                                    env=app_environment(settings), stdout=log_fh, stderr=subprocess.STDOUT)
            try:
                wait_healthy(port, proc)
                return take_screenshot(page_url(port, draft, section, month, fund, ask), output, chromium,
                                       width, height, wait_s)
            except Exception as e:
                log_fh.flush()
                tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
                raise RuntimeError(f"{e}\n--- streamlit log (tail) ---\n{tail}") from e
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m review_app.screenshot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True, help="PNG file to write")
    add_arguments(ap)
    ap.add_argument("--draft", help="draft text to put in the page")
    ap.add_argument("--section", help="section of the draft (市場動向, 運用状況, 今後の見通しと運用方針)")
    ap.add_argument("--month", help="report month YYYY-MM")
    ap.add_argument("--fund", help="fund name")
    ap.add_argument("--ask", action="store_true", help="also press Ask LLM (needs the model server)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--wait-s", type=float, default=120.0,
                    help="longest wait for the page (and the model with --ask) to finish (default 120)")
    ap.add_argument("--chromium", help="Chromium binary (default: chromium on PATH)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = ap.parse_args(argv)
    if Path(args.output).exists() and not args.overwrite:
        ap.error(f"{args.output} exists; pass --overwrite to replace it")
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("error: Chromium not found; install it with `apt-get install -y chromium` (make browser) "
              "or pass --chromium PATH", file=sys.stderr)
        return 2
    try:
        settings = from_args(args)
        out = screenshot(args.output, settings, chromium, args.draft, args.section, args.month, args.fund,
                         args.ask, args.width, args.height, args.wait_s)
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    w, h = png_size(out)
    print(f"wrote {out} ({w}x{h}, {out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
