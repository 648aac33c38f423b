"""Shared check of a training run's TensorBoard files against its metrics.jsonl (both backends)."""
from __future__ import annotations

import math
from pathlib import Path

from benchmarks.metrics import TB_DIR, TRACKED, read_tensorboard


def assert_tracked_like_metrics(out: Path, recs: list[dict]) -> dict:
    """Every :data:`TRACKED` metric is a ``train/<name>`` scalar in ``out/tb`` (read by TensorBoard's
    own reader) with one value per metrics.jsonl record, at the same steps and with the same values
    (float32 in the event file). Returns all scalar tags."""
    tags = read_tensorboard(Path(out) / TB_DIR)
    steps = [r["step"] for r in recs]
    for name in TRACKED:
        events = tags.get(f"train/{name}")
        assert events is not None, (name, sorted(tags))
        assert [s for s, _ in events] == steps, (name, events)
        for (_, got), rec in zip(events, recs):
            want = rec["tokens"] / rec["step_time_s"] if name == "tokens_per_s" else rec[name]
            assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12), (name, got, want)
    return tags
