"""MLflow for every command: the one place for tracking URIs, run names, the config as run parameters, the
run file a training run leaves behind and the summary figures later commands add to that run.

A training run with ``tracking.mlflow`` set (recipes.config.TrackingConfig) logs its per-step metrics
through its backend's own logger (NeMo: Lightning's MLFlowLogger in NeMoLogger; HF: transformers'
MLflowCallback) under the TensorBoard names, ``train/<name>`` for :data:`benchmarks.metrics.TRACKED`,
the resolved config as parameters ``section.key`` (:func:`config_params`), and writes
``<output_dir>/mlflow_run.json`` (:data:`RUN_FILE`: tracking URI, experiment, run id and name). Run again in
the same output dir (a resume), it starts a new run tagged with the one before (:func:`previous_run`).
``benchmarks.train_speed``, ``benchmarks.bleu``, ``benchmarks.fidelity`` and ``benchmarks.model_eval`` add
their summary figures to a run named by ``--mlflow-run`` (that directory or a run id; :func:`add_arguments`).

URIs: ``http(s)://`` (an MLflow server) or ``file:PATH`` (a local store; relative paths are made absolute).
The client's file store is in maintenance mode and refuses to open unless ``MLFLOW_ALLOW_FILE_STORE=true``;
:func:`tracking_uri` sets that for ``file:`` URIs (only when the variable is unset).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

RUN_FILE = "mlflow_run.json"
FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"
URI_ENV = "MLFLOW_TRACKING_URI"


class TrackingError(RuntimeError):
    """The named MLflow run cannot be found or written; the message names the run or URI."""


def tracking_uri(uri: str) -> str:
    """``uri`` ready for the MLflow client: ``file:`` paths made absolute (``file:///abs/path``), with
    ``MLFLOW_ALLOW_FILE_STORE=true`` set in this process's environment (inherited by its children)."""
    p = urlparse(uri)
    if p.scheme.lower() != "file":
        return uri
    os.environ.setdefault(FILE_STORE_ENV, "true")
    path = p.path if not p.netloc else f"/{p.netloc}{p.path}"  # file:./x parses as path ./x
    if not path:
        raise TrackingError(f"{uri}: a file: tracking URI needs a path, e.g. file:./mlruns")
    return Path(path).absolute().as_uri()


def run_names(experiment: Optional[str], run_name: Optional[str], config_name: str, backend: str, method: str,
              now: Optional[float] = None) -> tuple[str, str]:
    """(experiment, run name): the given ones, else the config's name and ``<backend>-<method>-<UTC time>``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return experiment or config_name, run_name or f"{backend}-{method}-{stamp}"


def config_params(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The resolved config (``ExperimentConfig.to_dict()`` or its YAML) as flat ``section.key`` parameters
    (``train.max_steps``, ``lora.dim``, ...; the top-level ``name``, ``method`` and ``output_dir`` as
    ``config.<key>``, so no name is one the frameworks log themselves: transformers logs ``output_dir``);
    lists as comma-separated text, null as ``None``."""
    out: dict[str, str] = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix or 'config.'}{k}"] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    walk(cfg, "")
    return out


def config_params_from_yaml(path: str | Path) -> dict[str, str]:
    from omegaconf import OmegaConf
    return config_params(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def write_run_file(output_dir: str | Path, uri: str, experiment: str, experiment_id: str, run_id: str,
                   run_name: str) -> Path:
    from recipes.fileio import write_json_atomic
    path = Path(output_dir) / RUN_FILE
    write_json_atomic(path, {"tracking_uri": uri, "experiment": experiment, "experiment_id": experiment_id,
                             "run_id": run_id, "run_name": run_name})
    return path


PREVIOUS_RUN_TAG = "previous_run_id"


def previous_run(output_dir: str | Path, uri: str) -> Optional[str]:
    """The MLflow run that an earlier training in ``output_dir`` named in its :data:`RUN_FILE`, when that run is
    on ``uri``: the same command run again (a resume from the run's checkpoint, or a fresh start where none was
    saved). A new run records it as tag :data:`PREVIOUS_RUN_TAG`, so the two halves of a resumed training find
    each other. Where that run is still RUNNING, its process died without ending it (SIGKILL, a lost node,
    scancel): it is ended as KILLED here. None where there is no such run; a run or server that cannot be read
    is said on stderr and counts as none (the new run still starts)."""
    f = Path(output_dir) / RUN_FILE
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
        if tracking_uri(rec["tracking_uri"]) != tracking_uri(uri):
            return None
        run_id = rec["run_id"]
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError, KeyError, TypeError, TrackingError) as e:
        print(f"mlflow: {f}: not read ({e}); the new run names no previous run", file=sys.stderr, flush=True)
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri(uri))
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
            print(f"mlflow: the previous run {run_id} of {output_dir} was still RUNNING (its process died): "
                  "ended as KILLED", flush=True)
    except MlflowException as e:
        print(f"mlflow: the previous run {run_id} of {output_dir}: {e.message}", file=sys.stderr, flush=True)
        return None
    return run_id


def resolve_run(run: str, uri: Optional[str] = None) -> tuple[str, str]:
    """(tracking URI, run id) of ``--mlflow-run``: a directory holding :data:`RUN_FILE` (a training run's
    output dir, or a benchmark's ``runs/<backend>``), that file itself, or a run id with ``uri`` (default:
    ``$MLFLOW_TRACKING_URI``)."""
    p = Path(run)
    f = p / RUN_FILE if p.is_dir() else p
    if f.is_file():
        try:
            rec = json.loads(f.read_text(encoding="utf-8"))
            return tracking_uri(uri or rec["tracking_uri"]), rec["run_id"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise TrackingError(f"{f}: not an MLflow run file ({e})") from None
    if p.is_dir():
        raise TrackingError(f"{p}: no {RUN_FILE} (was the run trained with tracking.mlflow set?)")
    uri = uri or os.environ.get(URI_ENV)
    if not uri:
        raise TrackingError(f"--mlflow-run {run}: a run id needs --mlflow-uri or ${URI_ENV}")
    return tracking_uri(uri), run


_BAD_KEY = re.compile(r"[^\w./\- :]")


def flat_numbers(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested summary (dicts; lists are left out) as ``prefix/key/subkey`` metric
    names (characters MLflow refuses become ``_``); booleans and text are left out."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flat_numbers(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[_BAD_KEY.sub("_", key)] = float(v)
    return out


def log_summary(uri: str, run_id: str, metrics: Mapping[str, float], params: Optional[Mapping[str, Any]] = None,
                step: int = 0) -> int:
    """Log summary figures (and parameters) to an existing run through MlflowClient; returns the number of
    metrics logged. Raises TrackingError when the run cannot be reached."""
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(uri))
    ts = int(time.time() * 1000)
    ms = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
    ps = [Param(k, str(v)) for k, v in (params or {}).items()]
    try:
        client.get_run(run_id)
        for i in range(0, max(len(ms), len(ps)), 100):  # log_batch takes at most 100 params per call
            client.log_batch(run_id, metrics=ms[i:i + 100], params=ps[i:i + 100])
    except MlflowException as e:
        raise TrackingError(f"MLflow run {run_id} at {uri}: {e.message}") from None
    except OSError as e:  # connection refused, ...
        raise TrackingError(f"MLflow run {run_id} at {uri}: {e}") from None
    return len(ms)


def add_arguments(parser) -> None:
    """``--mlflow-run`` / ``--mlflow-uri`` of the commands that log summary figures."""
    parser.add_argument("--mlflow-run", metavar="RUN", help="also log the summary figures to this MLflow run: a "
                        f"training output dir holding {RUN_FILE} (written when tracking.mlflow is set), that file, "
                        f"or a run id (with --mlflow-uri or ${URI_ENV})")
    parser.add_argument("--mlflow-uri", metavar="URI", help=f"tracking URI for --mlflow-run (default: the run "
                        f"file's, else ${URI_ENV}); http(s)://HOST:PORT or file:PATH ({FILE_STORE_ENV}=true is set "
                        "for file: stores)")


def log_from_args(args, metrics: Mapping[str, float], params: Optional[Mapping[str, Any]] = None) -> int:
    """A command's exit code after logging ``metrics`` to ``args.mlflow_run`` when it is given: 0 (a line on
    stdout says where), or 1 with the error on stderr (:class:`TrackingError`: the run or server named)."""
    if not getattr(args, "mlflow_run", None):
        return 0
    try:
        uri, run_id = resolve_run(args.mlflow_run, args.mlflow_uri)
        n = log_summary(uri, run_id, metrics, params)
    except TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"mlflow: {n} summary metrics -> run {run_id} at {uri}")
    return 0


def settings(tracking, config_name: str, method: str, backend: str) -> Optional[dict[str, str]]:
    """``{"uri", "experiment", "run_name"}`` of a run's ``tracking`` section (recipes.config.TrackingConfig),
    names defaulted by :func:`run_names`; None when ``tracking.mlflow`` is not set."""
    if not tracking.mlflow:
        return None
    experiment, run_name = run_names(tracking.experiment, tracking.run_name, config_name, backend, method)
    return {"uri": tracking_uri(tracking.mlflow), "experiment": experiment, "run_name": run_name}


class StepRun:
    """An MLflow run that a training loop writes itself, through MlflowClient: where the framework has no
    logger to hand the run to. The Megatron-Bridge backend uses it: the bridge's own MLflow logger
    (``LoggerConfig.mlflow_*``) uploads every saved checkpoint, optimizer state included, as run artifacts
    (``mlflow_utils.on_save_checkpoint_success``), hundreds of GiB a save for a 70B SFT.

    Made on the process that writes metrics.jsonl (global rank 0): the experiment (made when missing), a run
    named ``settings["run_name"]`` (tagged with the output dir's :func:`previous_run`), ``params``
    (:func:`config_params`) and ``<output_dir>/mlflow_run.json``.
    :meth:`log` adds one step's scalars as ``train/<name>`` (or another prefix: ``eval/``); :meth:`end` sets
    FINISHED or FAILED."""

    def __init__(self, settings: Mapping[str, str], output_dir: str | Path, params: Mapping[str, str]):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(settings["uri"])
        self.client = MlflowClient(self.uri)
        try:
            exp = self.client.get_experiment_by_name(settings["experiment"])
            experiment_id = exp.experiment_id if exp else self.client.create_experiment(settings["experiment"])
            previous = previous_run(output_dir, self.uri)
            run = self.client.create_run(experiment_id, run_name=settings["run_name"],
                                         tags={PREVIOUS_RUN_TAG: previous} if previous else None)
        except MlflowException as e:
            raise TrackingError(f"MLflow at {self.uri}: {e.message}") from None
        except OSError as e:
            raise TrackingError(f"MLflow at {self.uri}: {e}") from None
        self.run_id, self.ended = run.info.run_id, False
        log_summary(self.uri, self.run_id, {}, params)
        write_run_file(output_dir, self.uri, settings["experiment"], experiment_id, self.run_id,
                       settings["run_name"])

    def log(self, step: int, scalars: Mapping[str, float], prefix: str = "train/") -> None:
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{prefix}{k}", float(v), ts, int(step))
                                                    for k, v in scalars.items()])

    def end(self, status: str = "FINISHED") -> None:
        if not self.ended:
            self.client.set_terminated(self.run_id, status)
            self.ended = True
