"""A screenshot of TensorBoard's own UI with the training loss of several runs overlaid (the README's picture).

    python -m benchmarks.tracking_screenshot --run nemo=runs/bench/runs/nemo --run hf=runs/bench/runs/hf \\
        --output docs/tracking_loss.png [--tag train/loss]

Each ``--run NAME=DIR`` is a training output dir (its TensorBoard events are in ``DIR/tb``). TensorBoard
(``tensorboard`` of this venv) serves them on 127.0.0.1 as runs NAME (a temporary logdir of links), the time
series page filtered to the one tag with smoothing 0 is opened in headless Chromium
(``review_app.screenshot.take_screenshot``; ``make browser``), and the PNG is written; TensorBoard stops.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from benchmarks.metrics import TB_DIR
from benchmarks.serve import free_port
from review_app.screenshot import find_chromium, png_size, take_screenshot

# drawn when the tag's card is on the page with every run in its legend
READY_JS = """(() => {{
  const card = document.querySelector('scalar-card');
  return !!card && {names}.every(n => card.innerText.includes(n));
}})()"""


def wait_for_runs(port: int, proc: subprocess.Popen, names: list[str], tag: str, timeout: float = 120.0) -> None:
    """Block until TensorBoard lists ``tag`` for every run; RuntimeError if it exits or times out."""
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tensorboard exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                tags = json.load(r)
            if all(tag in tags.get(n, {}) for n in names):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"tensorboard did not show {tag} for runs {names} within {timeout:g} s")


def screenshot(runs: dict[str, Path], output: Path, chromium: str, tag: str = "train/loss",
               width: int = 1120, height: int = 620) -> Path:
    for name, d in runs.items():
        if not (d / TB_DIR).is_dir():
            raise FileNotFoundError(f"{d / TB_DIR}: no TensorBoard events for run {name}")
    with tempfile.TemporaryDirectory(prefix="tb-shot-") as tmp:
        for name, d in runs.items():
            (Path(tmp) / name).symlink_to((d / TB_DIR).absolute(), target_is_directory=True)
        port = free_port()
        cmd = [str(Path(sys.executable).with_name("tensorboard")), "--logdir", tmp, "--host", "127.0.0.1",
               "--port", str(port), "--reload_interval", "0"]
        with open(Path(tmp).parent / f"{Path(tmp).name}.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_runs(port, proc, list(runs), tag)
            q = urllib.parse.urlencode({"tagFilter": f"^{tag}$", "smoothing": "0"})
            return take_screenshot(f"http://127.0.0.1:{port}/?{q}#timeseries", output, chromium, width, height,
                                   wait_s=60, settle_s=3, ready_js=READY_JS.format(names=json.dumps(list(runs))))
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            Path(tmp).parent.joinpath(f"{Path(tmp).name}.log").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tracking_screenshot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                    help="a run's name in TensorBoard and its training output dir (repeat for each run)")
    ap.add_argument("--output", required=True, help="PNG to write")
    ap.add_argument("--tag", default="train/loss", help="scalar tag to show (default: %(default)s)")
    ap.add_argument("--chromium", help="Chromium binary (default: chromium on PATH)")
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.run:
        name, sep, d = spec.partition("=")
        if not sep or not name or not d or "/" in name:
            ap.error(f"--run {spec!r}: expected NAME=DIR")
        runs[name] = Path(d)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("error: no Chromium (make browser, or --chromium PATH)", file=sys.stderr)
        return 2
    try:
        out = screenshot(runs, Path(args.output), chromium, args.tag)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    w, h = png_size(out)
    print(f"{out}: {w}x{h} PNG, runs {', '.join(runs)}, tag {args.tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
