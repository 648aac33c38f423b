"""Launch the NeMo recipe with NeMo-Run: torchrun on this machine, or sbatch on a Slurm cluster.

    python -m recipes.finetune --config nemo_configs/swallow_8b_lora.yaml --backend nemo --executor local [--dry-run]
    python -m recipes.finetune --config nemo_configs/swallow_70b_sft.yaml --backend nemo --executor slurm \\
        --account ACCT --partition PART [--nodes 4 --gpus-per-node 8 --time 12:00:00] \\
        [--mount /lustre/models:/models --mount $PWD:$PWD] [--tunnel ssh --ssh-host H --ssh-user U --job-dir D] [--dry-run]

- :func:`local_executor` — ``run.LocalExecutor(ntasks_per_node=GPUs, launcher="torchrun", env_vars=...)``,
  as in NeMo 2's quickstart (``local_executor_torchrun``);
- :func:`slurm_executor` — ``run.SlurmExecutor`` as in the quickstart's ``slurm_executor``: one task per
  GPU, whole nodes (``exclusive``, ``mem=0``, ``gres=gpu:N``), the ``nvcr.io/nvidia/nemo:24.12``
  container through Pyxis, container mounts, the committed code shipped with ``GitArchivePackager``
  (or already in the image built from ``Dockerfile.nemo``: ``--packager none``), a local or SSH tunnel;
- :func:`launch_task` — what each rank runs: ``run.Partial(train, recipe=<the llm.finetune recipe of
  recipes.nemo_backend>)``; :func:`train` applies the process setup of ``recipes.cpu_shim.prepare_process``
  (``cpu_shim.apply_compat``: NeMo 2.1 resume fixes) on every rank before calling the recipe;
- :func:`executor_script` — what would be launched, rendered by NeMo-Run's own dry run
  (``Experiment.dryrun``): the sbatch script for Slurm, the torchrun command line for local;
- :func:`dry_run` — the validator's report, the resolved recipe and the executor script, as text;
- :func:`add_executor_args` / :func:`build_executor` / :func:`run_with_executor` — the command-line
  part that ``recipes.finetune`` wires in.

Every path in the recipe (model, data, output) is resolved on the launching machine; on a cluster
they must exist at the same paths inside the container, so mount them at identical paths
(``--mount /lustre/x:/lustre/x``); the dry run lists recipe paths no mount covers.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from recipes.config import ExperimentConfig
from recipes.fileio import write_text_atomic

DEFAULT_CONTAINER_IMAGE = "nvcr.io/nvidia/nemo:24.12"
DEFAULT_TIME = "04:00:00"
# The environment NeMo 2's quickstart and scripts/performance executors set for every rank, plus this
# project's rule that nothing is fetched from a model hub at run time.
NEMO_ENV_VARS = {
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",  # no recordStream on NCCL tensors: frees memory earlier
    "NCCL_NVLS_ENABLE": "0",  # NVLink SHARP probing stalls NCCL init on some systems
    "NVTE_DP_AMAX_REDUCE_INTERVAL": "0",  # Transformer Engine FP8 amax reduction settings (harmless in bf16)
    "NVTE_ASYNC_AMAX_REDUCTION": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class LaunchError(ValueError):
    """The executor options are inconsistent with each other or with the config."""


def targets_gpu(cfg: ExperimentConfig) -> bool:
    """True when the config is meant for GPUs (bf16/fp16 or more than one device), whatever this machine has."""
    return cfg.train.precision != "fp32" or cfg.world_size > 1


# ---------------------------------------------------------------------------------------------
# executors


def _env(extra: Optional[dict] = None) -> dict[str, str]:
    env = dict(NEMO_ENV_VARS)
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def local_executor(cfg: ExperimentConfig, *, env_vars: Optional[dict] = None, ntasks_per_node: Optional[int] = None):
    """``run.LocalExecutor`` running ``torchrun --nproc-per-node=train.num_devices`` on this machine."""
    import nemo_run as run

    if cfg.parallel.num_nodes != 1:
        raise LaunchError(f"parallel.num_nodes={cfg.parallel.num_nodes}: the local executor runs on one machine "
                          "(use --executor slurm)")
    n = ntasks_per_node or cfg.train.num_devices
    if n != cfg.train.num_devices:
        raise LaunchError(f"--gpus-per-node {n} differs from train.num_devices={cfg.train.num_devices} (the recipe's "
                          f"trainer uses the config's value: pass train.num_devices={n} instead)")
    return run.LocalExecutor(ntasks_per_node=n, launcher="torchrun", env_vars=_env(env_vars))


def _check_mounts(mounts: Sequence[str]) -> list[str]:
    out = []
    for m in mounts:
        parts = m.split(":")
        if len(parts) not in (2, 3) or not parts[0].startswith("/") or not parts[1].startswith("/"):
            raise LaunchError(f"--mount {m!r}: expected /host/path:/container/path[:ro]")
        out.append(m)
    return out


def slurm_executor(cfg: ExperimentConfig, *, account: str, partition: str, nodes: Optional[int] = None,
                   gpus_per_node: Optional[int] = None, container_image: str = DEFAULT_CONTAINER_IMAGE,
                   mounts: Sequence[str] = (), time: str = DEFAULT_TIME, tunnel: str = "local",
                   ssh_host: Optional[str] = None, ssh_user: Optional[str] = None, job_dir: Optional[str] = None,
                   packager: str = "git", env_vars: Optional[dict] = None):
    """``run.SlurmExecutor`` for this config, set up like NeMo 2's quickstart ``slurm_executor``.

    ``nodes``/``gpus_per_node`` default to ``parallel.num_nodes``/``train.num_devices`` and must equal
    them (the recipe's trainer is built from the config). ``tunnel`` is "local" (submitting from a
    login node; ``job_dir`` defaults to ``<output_dir>/nemo_run``, which must be on shared storage)
    or "ssh" (``ssh_host``, ``ssh_user`` and the remote ``job_dir`` required). ``packager`` "git"
    ships the committed code (``GitArchivePackager``), "none" expects it in the image.
    """
    import nemo_run as run

    if not account or not partition:
        raise LaunchError("--executor slurm needs --account and --partition")
    nodes = nodes or cfg.parallel.num_nodes
    gpus = gpus_per_node or cfg.train.num_devices
    if nodes != cfg.parallel.num_nodes or gpus != cfg.train.num_devices:
        raise LaunchError(f"--nodes {nodes} --gpus-per-node {gpus} differ from the config's parallel.num_nodes="
                          f"{cfg.parallel.num_nodes} x train.num_devices={cfg.train.num_devices}; the trainer is built "
                          f"from the config, so override it instead (parallel.num_nodes={nodes} "
                          f"train.num_devices={gpus})")
    if tunnel == "local":
        tun = run.LocalTunnel(job_dir=job_dir or str(Path(cfg.output_dir).absolute() / "nemo_run"))
    elif tunnel == "ssh":
        if not (ssh_host and ssh_user and job_dir):
            raise LaunchError("--tunnel ssh needs --ssh-host, --ssh-user and --job-dir (a directory on the cluster)")
        tun = run.SSHTunnel(host=ssh_host, user=ssh_user, job_dir=job_dir)
    else:
        raise LaunchError(f"--tunnel {tunnel!r}: expected local or ssh")
    packagers = {"git": run.GitArchivePackager, "none": run.Packager}
    if packager not in packagers:
        raise LaunchError(f"--packager {packager!r}: expected one of {sorted(packagers)}")
    executor = run.SlurmExecutor(
        account=account, partition=partition, tunnel=tun, nodes=nodes, ntasks_per_node=gpus, gpus_per_node=gpus,
        mem="0", exclusive=True, gres=f"gpu:{gpus}", time=time, packager=packagers[packager]())
    executor.container_image = container_image
    executor.container_mounts = _check_mounts(mounts)
    executor.env_vars = _env(env_vars)
    return executor


# ---------------------------------------------------------------------------------------------
# the task


def train(recipe, cpu: bool = False):
    """Entry point on every rank: the process setup ``recipes.nemo_backend.run`` does in-process
    (compat patches, safe globals for resuming), then the built ``llm.finetune`` partial."""
    from recipes import cpu_shim
    from recipes.nemo_kernels import check_sequence_parallel
    cpu_shim.prepare_process(cpu=cpu)
    check_sequence_parallel(recipe)
    return recipe()


def launch_task(cfg: ExperimentConfig, *, cpu: bool = False, nemo_path: Optional[str] = None):
    """(``run.Partial(train, recipe=...)``, note): the recipe as the ranks will run it. Without the HF dir
    (dry run before the download) the model section is left out and the note says so."""
    import nemo_run as run
    from recipes import nemo_recipe

    note = None
    try:
        recipe = nemo_recipe.build_recipe(cfg, cfg.output_dir, nemo_path=nemo_path, cpu=cpu)
    except FileNotFoundError as e:
        recipe = nemo_recipe.build_recipe(cfg, cfg.output_dir, nemo_path=nemo_path, cpu=cpu, with_model=False)
        note = f"model: built from {cfg.model.hf_path}/config.json at launch ({e})"
    return run.Partial(train, recipe=recipe, cpu=cpu), note


def executor_script(recipe, executor, name: str = "finetune") -> str:
    """What NeMo-Run would launch for ``recipe`` on ``executor``, without launching it.

    Runs ``run.Experiment(...).dryrun()`` on a copy of the executor in a temporary NeMo-Run home
    (nothing is submitted, no tunnel is opened, the real ``$NEMORUN_HOME`` is not touched) and returns
    the sbatch script it writes (Slurm) or the torchrun command line and environment (local).
    """
    import nemo_run as run

    base = tempfile.mkdtemp(prefix="nemo_run_dryrun-")
    stdin = sys.stdin
    try:
        ex = executor.clone()
        # Slurm packaging shells out through invoke, which forwards our stdin to the child: give it none.
        sys.stdin = io.StringIO("")
        with contextlib.redirect_stdout(io.StringIO()):
            with run.Experiment(name, executor=ex, log_level="ERROR", base_dir=base) as exp:
                exp.add(recipe, name=name, tail_logs=False)
                exp.dryrun(log=False, delete_exp_dir=False)
        job = exp.jobs[0]
        if isinstance(job.executor, run.SlurmExecutor):
            path = Path(job.executor.experiment_dir) / f"{job.executor.job_name}_sbatch.sh"
            text = path.read_text(encoding="utf-8")
        else:
            lines = [f"# NeMo-Run {type(job.executor).__name__}: {job.executor.nnodes()} node(s) x "
                     f"{job.executor.nproc_per_node()} process(es)"]
            for role in job._executable.roles:  # the torchx AppDef NeMo-Run built (nemo_run 0.3.0)
                # torchx's local scheduler prepends role.env["PATH"] to the inherited PATH
                lines += [f"export {k}={v}:$PATH" if k == "PATH" else f"export {k}={v}"
                          for k, v in sorted(role.env.items())]
                lines.append(" ".join([role.entrypoint, *role.args]))
            text = "\n".join(lines) + "\n"
        return text.replace(base, "$NEMORUN_HOME")
    finally:
        sys.stdin = stdin
        shutil.rmtree(base, ignore_errors=True)


def _recipe_paths(cfg: ExperimentConfig) -> list[str]:
    from recipes import nemo_import
    return [str(Path(cfg.model.hf_path).absolute()), str(nemo_import.default_nemo_path(cfg.model.hf_path)),
            str(Path(cfg.data.dataset_dir).absolute()), str(Path(cfg.output_dir).absolute())]


def uncovered_paths(paths: Sequence[str], mounts: Sequence[str]) -> list[str]:
    """Paths that no ``src:dst`` mount makes visible at the same place inside the container."""
    same = [m.split(":")[1] for m in mounts if m.split(":")[0] == m.split(":")[1]]
    return [p for p in paths if not any(p == d or p.startswith(d.rstrip("/") + "/") for d in same)]


def _import_state(cfg: ExperimentConfig, nemo_path: Path) -> str:
    from recipes import nemo_import
    if nemo_import.import_is_complete(cfg.model.hf_path, nemo_path):
        return "imported"
    return f"not there yet: python -m recipes.nemo_backend import {cfg.model.hf_path} --family {cfg.model.family}"


def dry_run(cfg: ExperimentConfig, executor=None, gpu_memory_gb: float = 80.0) -> tuple[str, list[str]]:
    """(text, problems): the validator report, the recipe each rank would run and, with an executor,
    the script NeMo-Run would launch. Needs neither the model nor a GPU."""
    import nemo_run as run
    from recipes import nemo_import
    from recipes.validate import report

    cpu = not targets_gpu(cfg)
    text, problems = report(cfg, gpu_memory_gb)
    task, note = launch_task(cfg, cpu=cpu)
    nemo_path = nemo_import.default_nemo_path(cfg.model.hf_path)
    parts = [text, "",
             f"# NeMo 2.1 recipe for {cfg.name} ({cfg.method}), {'CPU' if cpu else 'GPU'}: "
             f"{cfg.parallel.num_nodes} node(s) x {cfg.train.num_devices} device(s)",
             f"# base checkpoint: {nemo_path} ({_import_state(cfg, nemo_path)})"]
    if note:
        parts.append(f"# {note}")
    parts.append(str(task))
    if executor is not None:
        parts += ["", f"# executor: {type(executor).__name__}", executor_script(task, executor, name=cfg.name)]
        if isinstance(executor, run.SlurmExecutor):
            missing = uncovered_paths(_recipe_paths(cfg), executor.container_mounts)
            if missing:
                parts.append("# WARNING: not mounted at the same path in the container (add --mount P:P): "
                             + ", ".join(missing))
    return "\n".join(parts), problems


# ---------------------------------------------------------------------------------------------
# command line (wired into recipes.finetune)


def add_executor_args(parser: argparse.ArgumentParser) -> None:
    """``--executor local|slurm`` and the Slurm options, in their own argument group."""
    g = parser.add_argument_group("NeMo-Run launch (--backend nemo)")
    g.add_argument("--executor", choices=["local", "slurm"],
                   help="run the NeMo recipe through NeMo-Run: torchrun on this machine, or sbatch on Slurm")
    g.add_argument("--nodes", type=int, help="Slurm nodes (default and required value: parallel.num_nodes)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node (default and required value: train.num_devices)")
    g.add_argument("--account", help="Slurm account")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--time", default=DEFAULT_TIME, help="Slurm time limit (default: %(default)s)")
    g.add_argument("--container-image", default=DEFAULT_CONTAINER_IMAGE,
                   help="container for Slurm (Pyxis) (default: %(default)s; or your image built from Dockerfile.nemo)")
    g.add_argument("--mount", action="append", default=[], metavar="SRC:DST",
                   help="container mount, repeatable; mount model/data/output dirs at the same path")
    g.add_argument("--tunnel", choices=["local", "ssh"], default="local",
                   help="submit from this (login) node, or over SSH (default: %(default)s)")
    g.add_argument("--ssh-host", help="cluster login host (--tunnel ssh)")
    g.add_argument("--ssh-user", help="cluster user (--tunnel ssh)")
    g.add_argument("--job-dir", help="NeMo-Run job dir on the cluster (default with --tunnel local: <output_dir>/nemo_run)")
    g.add_argument("--packager", choices=["git", "none"], default="git",
                   help="ship the committed code with the job (git), or use the code in the image (none)")
    g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment variable, repeatable")


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def build_executor(args: argparse.Namespace, cfg: ExperimentConfig):
    """The executor that ``args`` (from :func:`add_executor_args`) ask for; None without --executor."""
    if not getattr(args, "executor", None):
        return None
    env = _parse_env(args.env)
    if args.executor == "local":
        if args.nodes not in (None, 1):
            raise LaunchError(f"--nodes {args.nodes}: the local executor runs on this machine only")
        return local_executor(cfg, env_vars=env, ntasks_per_node=args.gpus_per_node)
    return slurm_executor(cfg, account=args.account, partition=args.partition, nodes=args.nodes,
                          gpus_per_node=args.gpus_per_node, container_image=args.container_image, mounts=args.mount,
                          time=args.time, tunnel=args.tunnel, ssh_host=args.ssh_host, ssh_user=args.ssh_user,
                          job_dir=args.job_dir, packager=args.packager, env_vars=env)


def run_with_executor(args: argparse.Namespace, cfg: ExperimentConfig) -> int:
    """``--backend nemo`` with ``--executor`` (or a ``--dry-run`` of a GPU config): validate, then print
    the dry run or launch. Exit status 0 ok, 1 the config does not fit/divide, 2 bad launch options."""
    import nemo_run as run
    from recipes import cpu_shim, nemo_import
    from recipes.validate import validate

    try:
        executor = build_executor(args, cfg)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        text, problems = dry_run(cfg, executor)
        print(text)
        return 1 if problems else 0
    if executor is None:
        print("error: --executor local|slurm is needed to launch a GPU recipe", file=sys.stderr)
        return 2
    problems = validate(cfg)
    if problems:
        print(f"error: {cfg.name}: " + "\n  - ".join(["the config cannot run:", *problems]), file=sys.stderr)
        return 1
    nemo_path = nemo_import.default_nemo_path(cfg.model.hf_path)
    if not (Path(cfg.model.hf_path) / "config.json").is_file():
        # the model section of the recipe is built from it here, on the submitting machine
        print(f"error: {cfg.model.hf_path}/config.json is not visible on this machine; the recipe is built here and "
              "used unchanged in the container, so the model dir must exist at the same path on both", file=sys.stderr)
        return 2
    cpu = False  # Slurm: the ranks run on the cluster's GPU nodes, whatever the submitting machine has
    if isinstance(executor, run.LocalExecutor):
        from recipes.inputs import ensure_inputs
        ensure_inputs(cfg)  # prepared data (model dirs are never built for production configs)
        cpu = cpu_shim.prepare_process()  # torchrun here: the ranks have what this machine has (gloo on a CPU)
        if shutil.which("torchrun") is None:  # NeMo-Run calls it by name: this python's, venv not activated
            os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        nemo_path = nemo_import.import_hf(cfg.model.hf_path, family=cfg.model.family)  # cached
    elif not nemo_import.import_is_complete(cfg.model.hf_path, nemo_path):
        print(f"error: {nemo_path} is not a finished import of {cfg.model.hf_path}; run `python -m "
              f"recipes.nemo_backend import {cfg.model.hf_path} --family {cfg.model.family}` in the container first",
              file=sys.stderr)
        return 2
    task, _ = launch_task(cfg, cpu=cpu, nemo_path=str(nemo_path))
    out = Path(cfg.output_dir).absolute()
    write_text_atomic(out / "resolved_config.yaml", cfg.to_yaml())
    write_text_atomic(out / "nemo_recipe.txt", str(task) + "\n")
    slurm = isinstance(executor, run.SlurmExecutor)
    run.run(task, executor=executor, name=cfg.name, detach=slurm, tail_logs=not slurm)
    return 0
