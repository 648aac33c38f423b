"""MLflow helpers (benchmarks.tracking) and the commands that add summary figures to a named run: against
a real local file: store, and the test's MLflow server on 127.0.0.1 (tests/conftest.py mlflow_server).
The training runs' per-step metrics are checked where the runs are (tests/test_hf_backend.py,
tests/test_nemo_backend.py: tracking_checks.assert_mlflow_like_metrics)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import tracking
from recipes.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def _new_run(uri: str, experiment: str = "t", name: str = "r") -> str:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking.tracking_uri(uri))
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    return client.create_run(exp_id, run_name=name).info.run_id


def _metrics(uri: str, run_id: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient
    return dict(MlflowClient(tracking.tracking_uri(uri)).get_run(run_id).data.metrics)


def test_file_uris_are_made_absolute_and_allowed(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.FILE_STORE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert tracking.FILE_STORE_ENV not in os.environ
    assert tracking.tracking_uri("file:./mlruns") == (tmp_path / "mlruns").as_uri()
    assert os.environ[tracking.FILE_STORE_ENV] == "true"
    assert tracking.tracking_uri(f"file://{tmp_path}/x") == (tmp_path / "x").as_uri()


def test_the_client_refuses_a_file_store_without_the_opt_in(tmp_path, monkeypatch):
    """What tracking_uri's MLFLOW_ALLOW_FILE_STORE is for (mlflow-skinny's file store is in maintenance mode)."""
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv(tracking.FILE_STORE_ENV, "false")
    with pytest.raises(Exception, match="maintenance mode"):
        MlflowClient((tmp_path / "s").as_uri()).search_experiments()
    monkeypatch.delenv(tracking.FILE_STORE_ENV)
    MlflowClient(tracking.tracking_uri(f"file:{tmp_path / 's'}")).search_experiments()


def test_run_names_default_to_config_backend_method_and_utc_time():
    assert tracking.run_names(None, None, "tiny_lora", "nemo", "lora", now=0) == ("tiny_lora", "nemo-lora-19700101T000000Z")
    assert tracking.run_names("e", "r", "tiny_lora", "hf", "sft") == ("e", "r")
    cfg = load_config(ROOT / "nemo_configs/tiny_sft.yaml", ["tracking.mlflow=http://h:1", "tracking.experiment=x"])
    s = tracking.settings(cfg.tracking, cfg.name, cfg.method, "hf")
    assert s["uri"] == "http://h:1" and s["experiment"] == "x" and s["run_name"].startswith("hf-sft-")
    assert tracking.settings(load_config(ROOT / "nemo_configs/tiny_sft.yaml").tracking, "n", "sft", "hf") is None


def test_config_params_are_flat_section_keys():
    cfg = load_config(ROOT / "nemo_configs/tiny_lora.yaml")
    p = tracking.config_params(cfg.to_dict())
    assert p["train.max_steps"] == str(cfg.train.max_steps) and p["lora.dim"] == "8"
    assert p["lora.target_modules"] == "linear_qkv,linear_proj,linear_fc1,linear_fc2"
    assert p["config.name"] == "tiny_lora" and p["tracking.mlflow"] == "None"
    assert not [k for k in p if "." not in k]


def test_bad_tracking_uri_names_file_and_field(tmp_path):
    with pytest.raises(ConfigError, match=r"tiny_lora\.yaml: tracking\.mlflow: .*sqlite.*mlflow server"):
        load_config(ROOT / "nemo_configs/tiny_lora.yaml", ["tracking.mlflow=sqlite:///x.db"])


def test_flat_numbers_keeps_finite_numbers_with_safe_names():
    got = tracking.flat_numbers({"a": 1, "b": {"c": 2.5, "d": [1, 2], "e": "x", "f": True, "g": float("nan"),
                                               "市場動向": 3, "h(i)": 4}}, "p")
    assert got == {"p/a": 1.0, "p/b/c": 2.5, "p/b/市場動向": 3.0, "p/b/h_i_": 4.0}


def test_resolve_run_reads_the_run_file_or_needs_a_uri(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.URI_ENV, raising=False)
    tracking.write_run_file(tmp_path, "http://h:1", "e", "1", "abc", "r")
    assert tracking.resolve_run(str(tmp_path)) == ("http://h:1", "abc")
    assert tracking.resolve_run(str(tmp_path / tracking.RUN_FILE), "http://o:2") == ("http://o:2", "abc")
    with pytest.raises(tracking.TrackingError, match="needs --mlflow-uri"):
        tracking.resolve_run("abc")
    (tmp_path / "untracked").mkdir()
    with pytest.raises(tracking.TrackingError, match="no mlflow_run.json"):
        tracking.resolve_run(str(tmp_path / "untracked"))


def _pairs(tmp_path) -> tuple[Path, Path, Path]:
    rows = [json.loads(line) for line in (ROOT / "datasets/demo_pairs.jsonl").read_text(encoding="utf-8").splitlines()[:6]]
    pred, ref = tmp_path / "pred.jsonl", tmp_path / "ref.jsonl"
    pred.write_text("".join(json.dumps({"prediction": r["draft"], "draft": r["draft"]}, ensure_ascii=False) + "\n"
                            for r in rows), encoding="utf-8")
    ref.write_text("".join(json.dumps({"output": r["final"], "draft": r["draft"]}, ensure_ascii=False) + "\n"
                           for r in rows), encoding="utf-8")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"draft": r["draft"], "final": r["final"]}, ensure_ascii=False) + "\n"
                             for r in rows), encoding="utf-8")
    return pred, ref, pairs


def test_bleu_and_fidelity_log_their_summary_to_a_file_store_run(tmp_path, capsys):
    from benchmarks import bleu, fidelity

    uri = f"file:{tmp_path / 'mlruns'}"
    run_id = _new_run(uri)
    tracking.write_run_file(tmp_path / "train", tracking.tracking_uri(uri), "t", "0", run_id, "r")
    pred, ref, pairs = _pairs(tmp_path)
    assert bleu.main(["--predictions", str(pred), "--references", str(ref), "--tokenize", "char",
                      "--json", str(tmp_path / "b.json"), "--mlflow-run", str(tmp_path / "train")]) == 0
    assert fidelity.main(["--pairs", str(pairs), "--mlflow-run", run_id, "--mlflow-uri", uri]) == 0
    assert f"-> run {run_id}" in capsys.readouterr().out
    got = _metrics(uri, run_id)
    b = json.loads((tmp_path / "b.json").read_text(encoding="utf-8"))
    assert got["eval/bleu/score"] == b["score"] and got["eval/bleu/chrf"] == b["chrf"]
    assert got["eval/rates/style_compliance"] == b["rates"]["style_compliance"]
    assert got["eval/rates/fact_recall"] == b["rates"]["fact_recall"]
    assert {k for k in got if k.startswith("eval/bleu/per_section/")} == {
        f"eval/bleu/per_section/{s}/{x}" for s in b["per_section"] for x in ("score", "score01", "n")}
    assert got["fidelity/pairs"] == 6.0 and 0 <= got["fidelity/faithful_share"] <= 1


def test_previous_run_ends_a_run_left_running_and_names_it(tmp_path, capsys):
    """A rerun in the same output dir: the run in its mlflow_run.json, on the same server, is the previous run;
    one left RUNNING (its process was SIGKILLed) is ended as KILLED, a FINISHED one is left as it is."""
    from mlflow.tracking import MlflowClient
    uri = tracking.tracking_uri(f"file:{tmp_path / 'mlruns'}")
    client = MlflowClient(uri)
    out = tmp_path / "run"
    assert tracking.previous_run(out, uri) is None  # no run file: a first run
    killed = _new_run(uri)
    tracking.write_run_file(out, uri, "t", "0", killed, "r")
    assert tracking.previous_run(out, f"file:{tmp_path / 'elsewhere'}") is None  # another store: not its run
    assert client.get_run(killed).info.status == "RUNNING"
    assert tracking.previous_run(out, uri) == killed
    assert client.get_run(killed).info.status == "KILLED"
    assert "was still RUNNING" in capsys.readouterr().out
    finished = _new_run(uri)
    client.set_terminated(finished, "FINISHED")
    tracking.write_run_file(out, uri, "t", "0", finished, "r")
    assert tracking.previous_run(out, uri) == finished and client.get_run(finished).info.status == "FINISHED"
    tracking.write_run_file(out, uri, "t", "0", "0123456789abcdef", "r")  # deleted from the server
    assert tracking.previous_run(out, uri) is None
    assert "0123456789abcdef" in capsys.readouterr().err
    (out / tracking.RUN_FILE).write_text("{", encoding="utf-8")
    assert tracking.previous_run(out, uri) is None and "not read" in capsys.readouterr().err


def test_a_missing_run_is_an_error_naming_it(tmp_path, capsys):
    from benchmarks import fidelity
    _, _, pairs = _pairs(tmp_path)
    uri = f"file:{tmp_path / 'mlruns'}"
    _new_run(uri)
    assert fidelity.main(["--pairs", str(pairs), "--mlflow-run", "0123456789abcdef", "--mlflow-uri", uri]) == 1
    assert "MLflow run 0123456789abcdef" in capsys.readouterr().err


def test_train_speed_logs_each_backends_figures_to_its_run(mlflow_server, tmp_path):
    """benchmarks.train_speed's last step, on the report's summary.json (a committed benchmark run's figures)
    and two runs on the test's MLflow server, named by the runs' mlflow_run.json."""
    from benchmarks.train_speed import log_summary_to_runs

    summary = {"runs": [{"backend": "nemo", "step_time_median_s": 0.5, "tokens_per_s_per_device": 1000.0,
                         "step_times_s": [0.5, 0.6], "peak_rss_bytes": 2.0e9},
                        {"backend": "hf", "step_time_median_s": 0.25, "tokens_per_s_per_device": 2000.0,
                         "step_times_s": [0.25], "peak_rss_bytes": 1.0e9}],
               "speedup": {"t_hf_over_t_nemo": 0.5, "ratio_ci95": [0.4, 0.6]}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    dirs = [tmp_path / "runs" / b for b in ("nemo", "hf")]
    ids = []
    for d in dirs:
        ids.append(_new_run(mlflow_server, "bench", d.name))
        tracking.write_run_file(d, mlflow_server, "bench", "0", ids[-1], d.name)
    assert log_summary_to_runs(tmp_path, dirs) == 0
    nemo, hf = (_metrics(mlflow_server, i) for i in ids)
    assert nemo == {"bench/step_time_median_s": 0.5, "bench/tokens_per_s_per_device": 1000.0,
                    "bench/peak_rss_bytes": 2.0e9, "bench/speedup/t_hf_over_t_nemo": 0.5}
    assert hf["bench/step_time_median_s"] == 0.25 and hf["bench/speedup/t_hf_over_t_nemo"] == 0.5


def test_model_eval_logs_each_models_figures(tmp_path):
    from argparse import Namespace

    from benchmarks.model_eval import log_results_to_mlflow

    uri = f"file:{tmp_path / 'mlruns'}"
    run_id = _new_run(uri)
    out = tmp_path / "eval"
    out.mkdir()
    models = {n: {"url": "x", "bleu": {"score": s, "chrf": 40.0}, "rates": {"fact_recall": 0.9, "style_compliance": None},
                  "fidelity": None, "style": {"compliance": 1.0}} for n, s in (("base", 10.0), ("lora", 20.0))}
    (out / "results.json").write_text(json.dumps({"models": models}))
    assert log_results_to_mlflow(Namespace(output=str(out), mlflow_run=run_id, mlflow_uri=uri)) == 0
    assert _metrics(uri, run_id) == {"model_eval/base/bleu/score": 10.0, "model_eval/base/bleu/chrf": 40.0,
                                     "model_eval/base/rates/fact_recall": 0.9, "model_eval/base/style/compliance": 1.0,
                                     "model_eval/lora/bleu/score": 20.0, "model_eval/lora/bleu/chrf": 40.0,
                                     "model_eval/lora/rates/fact_recall": 0.9, "model_eval/lora/style/compliance": 1.0}


def test_tracking_screenshot_shows_both_runs_in_tensorboards_ui(tmp_path):
    """The README's picture command on two runs' event files: TensorBoard on 127.0.0.1, headless Chromium."""
    from torch.utils.tensorboard import SummaryWriter

    from benchmarks.tracking_screenshot import main
    from review_app.screenshot import find_chromium, png_size

    if find_chromium() is None:
        pytest.skip("no Chromium (make browser)")
    for name, loss0 in (("nemo", 7.0), ("hf", 6.8)):
        with SummaryWriter(str(tmp_path / name / "tb")) as w:
            for step in range(1, 6):
                w.add_scalar("train/loss", loss0 - 0.1 * step, step)
    out = tmp_path / "shot.png"
    assert main(["--run", f"nemo={tmp_path / 'nemo'}", "--run", f"hf={tmp_path / 'hf'}", "--output", str(out)]) == 0
    assert png_size(out) == (1120, 620) and out.stat().st_size > 10_000
    assert main(["--run", f"x={tmp_path / 'missing'}", "--output", str(out)]) == 1
