"""Launch the review page: ``python -m review_app [--db URL] [--base-url URL] [--model NAME] [--port N]``.

Runs ``streamlit run review_app/app.py`` in a child process with the settings in REVIEW_*
environment variables (review_app.settings). Usage statistics are off: the page talks to nothing
but the model server and the database.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from review_app.settings import Settings, add_arguments, from_args

APP = Path(__file__).resolve().parent / "app.py"


def streamlit_command(port: int, address: str = "127.0.0.1", headless: bool = False) -> list[str]:
    """The ``streamlit run`` command line for the page (settings go in the environment)."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
            "--server.address", address, "--server.headless", str(headless).lower(),
            "--browser.gatherUsageStats", "false", "--global.developmentMode", "false"]


def app_environment(settings: Settings, environ: dict | None = None) -> dict[str, str]:
    """The child's environment: ours plus the settings; the repo root on PYTHONPATH so the page
    imports recipes/ and review_app/ wherever it is started from."""
    env = dict(os.environ if environ is None else environ)
    env.update(settings.to_env())
    root = str(APP.parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m review_app", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    ap.add_argument("--port", type=int, default=8501, help="port of the page (default 8501)")
    ap.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                    "0.0.0.0 to share it on the network)")
    ap.add_argument("--headless", action="store_true", help="do not open a browser")
    args = ap.parse_args(argv)
    try:
        settings = from_args(args)
    except ValueError as e:
        ap.error(str(e))
    cmd = streamlit_command(args.port, args.address, args.headless)
    print(f"review app on http://{args.address}:{args.port}  model {settings.model} at {settings.base_url}",
          flush=True)
    proc = subprocess.Popen(cmd, env=app_environment(settings))
    # a service manager stops us with SIGTERM: pass it on, or the page would outlive its launcher
    signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reaches the child too; wait for it to shut down
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
