"""Test hook, loaded by every process of a run started with ``tests/run_checks.paused_after(step)`` (this directory
first on ``PYTHONPATH``): once ``benchmarks.metrics`` is imported, its metrics writer stops for good after writing
step ``FUNDCOMMENT_TEST_PAUSE_AFTER_STEP``, so ``run_checks.kill_when_step`` kills the run at that step however
fast its steps are. Without it a tiny model's 35-ms steps ran past the step between two polls (CI, 2026-12-07:
``test_hf_data_parallel_run_resumes_after_a_kill``, "not killed mid-way"). Nothing else is changed."""
import importlib.abc
import importlib.util
import os
import sys
import time

STEP = int(os.environ.get("FUNDCOMMENT_TEST_PAUSE_AFTER_STEP", "0"))


class _PauseAfterStep(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "benchmarks.metrics":
            return None
        sys.meta_path.remove(self)  # find the real module, then wrap its loading
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            write = module.StepTimer.write

            def write_then_pause(timer, rec):
                write(timer, rec)
                if rec.step >= STEP:
                    print(f"pause_hook: step {rec.step} written; waiting to be killed", file=sys.stderr, flush=True)
                    while True:
                        time.sleep(60)

            module.StepTimer.write = write_then_pause

        spec.loader.exec_module = exec_and_patch
        return spec


if STEP > 0:
    sys.meta_path.insert(0, _PauseAfterStep())
