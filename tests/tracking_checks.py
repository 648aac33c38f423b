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


def assert_mlflow_like_metrics(out: Path, recs: list[dict], backend: str, config_name: str):
    """The run named by ``out/mlflow_run.json`` is FINISHED on its tracking server (read back with
    MlflowClient): experiment = the config name, run name ``<backend>-<method>-<UTC time>``, the resolved
    config as ``section.key`` params, and every :data:`TRACKED` metric as ``train/<name>`` with one value
    per metrics.jsonl record, at the same steps and with the same values. Returns (client, run)."""
    import json

    from mlflow.tracking import MlflowClient

    from benchmarks.tracking import RUN_FILE, config_params_from_yaml, tracking_uri

    info = json.loads((Path(out) / RUN_FILE).read_text())
    client = MlflowClient(tracking_uri(info["tracking_uri"]))
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED", run.info
    assert run.info.run_name == info["run_name"] and run.info.run_name.startswith(f"{backend}-"), run.info.run_name
    assert client.get_experiment(run.info.experiment_id).name == config_name == info["experiment"]
    params = config_params_from_yaml(Path(out) / "resolved_config.yaml")
    assert {k: run.data.params.get(k) for k in params} == params
    steps = [r["step"] for r in recs]
    for name in TRACKED:
        hist = sorted(client.get_metric_history(run.info.run_id, f"train/{name}"), key=lambda m: m.step)
        assert [m.step for m in hist] == steps, (name, [(m.step, m.value) for m in hist])
        for m, rec in zip(hist, recs):
            want = rec["tokens"] / rec["step_time_s"] if name == "tokens_per_s" else rec[name]
            assert math.isclose(m.value, want, rel_tol=1e-9, abs_tol=1e-12), (name, m.step, m.value, want)
    return client, run


def assert_resumed_mlflow_run(out: Path, killed_run_id: str, resumed: list[dict], backend: str, config_name: str):
    """A run killed mid-way and run again in ``out``: the killed run is KILLED (ended by the rerun: its own
    process could not), and the new run is tagged with it and holds the steps trained after the resume
    (``resumed``: those metrics.jsonl records), as :func:`assert_mlflow_like_metrics` checks."""
    from benchmarks.tracking import PREVIOUS_RUN_TAG
    client, run = assert_mlflow_like_metrics(out, resumed, backend, config_name)
    assert run.info.run_id != killed_run_id
    assert client.get_run(killed_run_id).info.status == "KILLED"
    assert run.data.tags.get(PREVIOUS_RUN_TAG) == killed_run_id, run.data.tags
