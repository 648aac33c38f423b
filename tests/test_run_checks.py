"""The helpers the training-run tests rely on: a run started with run_checks.paused_after(N) stops after writing
step N, so kill_when_step kills it there however fast its steps are; without it, a fast run is caught going past."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from run_checks import kill_when_step, paused_after

ROOT = Path(__file__).resolve().parents[1]
# three 1-ms steps through the metrics writer every backend uses
STEPS = textwrap.dedent("""
    import sys, time
    from benchmarks.metrics import StepTimer
    timer = StepTimer(sys.argv[1], "test")
    for step in (1, 2, 3):
        timer.begin()
        time.sleep(0.001)
        timer.end(step, loss=1.0, lr=0.1)
    print("finished", flush=True)
""")


def _start(out: Path, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STEPS, str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_a_paused_run_is_killed_at_the_step(tmp_path):
    proc = _start(tmp_path, paused_after(2))
    records = kill_when_step(proc, tmp_path / "metrics.jsonl", 2)
    assert [r["step"] for r in records] == [1, 2] and proc.returncode < 0  # killed, not finished


def test_a_run_without_the_pause_is_caught_going_past_the_step(tmp_path):
    proc = _start(tmp_path)
    proc.wait(timeout=120)  # finished before the helper looks: what a fast run did between two polls
    with pytest.raises(AssertionError, match="went on past step 2 to 3"):
        kill_when_step(proc, tmp_path / "metrics.jsonl", 2)
