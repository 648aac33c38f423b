"""The tail of a command's ``main()``: run the work, print its report on stdout and exit 0, or turn
an expected failure into one ``error: ...`` line on stderr and a non-zero exit status.

:func:`run_command` is that tail for the converters (``convert.run_json_command``: convert.hf_to_nemo,
convert.nemo_to_hf print their report as one JSON line) and for the endpoint benchmarks
(``benchmarks.openai_client.report_command``: benchmarks.model_eval, benchmarks.inference_speed
print the results.md they wrote).

:func:`print_line` is a command's closing line where several ranks share one stdout (srun, torchrun).
"""
from __future__ import annotations

import json
import sys
from typing import Any, Callable


def run_command(call: Callable[[], Any], errors: tuple[type[BaseException], ...],
                bad_input: tuple[type[BaseException], ...] = (),
                show: Callable[[Any], str] = json.dumps) -> int:
    """Run ``call``; print ``show(its result)`` (default: the result as one JSON line) and return 0.
    An exception of ``errors`` (the work failed) prints ``error: MESSAGE`` to stderr and returns 1,
    one of ``bad_input`` (checked after ``errors``) the same and returns 2; anything else propagates.
    The messages are the exceptions' own, so they must name the file, tensor or endpoint."""
    try:
        result = call()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except bad_input as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(show(result))
    return 0


def print_line(text: str) -> None:
    """Print ``text`` and its newline in one write, after flushing what came before. Ranks that share one
    stdout (srun's task output, torchrun's) interleave at write boundaries, and ``print`` under
    ``python -u`` writes the text and its newline separately: two ranks' ``done: OUT`` became
    ``done: OUTdone: OUT\n\n`` in a Slurm job's log (seen in CI)."""
    sys.stdout.flush()
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
