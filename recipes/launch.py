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
  (or already in the image built from ``Dockerfile.nemo``: ``--packager none``), a local or SSH tunnel.
  ``--gpus-per-node 0`` (the default for a CPU config: fp32 on one device) makes it a CPU job: one task per
  ``train.num_devices``, no GPU request, the CPU recipe (gloo) on every rank. ``--container-image none``
  runs the ranks without a container: with the submitting python's environment (its bin dir first on
  ``PATH``), NeMo-Run's Pyxis options taken off the ``srun`` line (:data:`HOST_SRUN`); this is how
  ``tests/test_slurm.py`` runs real jobs on a one-node Slurm;
- :func:`launch_task` — what each rank runs: ``run.Partial(train, recipe=<the llm.finetune recipe of
  recipes.nemo_backend>)``; :func:`train` applies the process setup of ``recipes.cpu_shim.prepare_process``
  (``cpu_shim.apply_compat``: NeMo 2.1 resume fixes) on every rank before calling the recipe;
- :func:`executor_script` — what would be launched, rendered by NeMo-Run's own dry run
  (``Experiment.dryrun``): the sbatch script for Slurm, the torchrun command line for local;
- :func:`dry_run` — the validator's report, the resolved recipe and the executor script, as text;
- :func:`add_executor_args` / :func:`build_executor` / :func:`run_with_executor` — the command-line
  part that ``recipes.finetune`` wires in.

``--backend bridge`` (:func:`run_bridge_with_executor`) launches the same way, with a plain command instead of
a recipe: ``run.Script`` of ``python -m recipes.bridge_backend run --config ... [overrides]`` on every rank
(:func:`bridge_task`) — the bridge's venv's ``torchrun`` (its bin dir first on ``PATH``) for the local
executor, the bridge's python as each Slurm task (``nvcr.io/nvidia/nemo:26.02``, the base of
``Dockerfile.bridge``, by default; ``--container-image none``: ``.venv-bridge``'s python).

Every path in the recipe (model, data, output) is resolved on the launching machine; on a cluster
they must exist at the same paths inside the container, so mount them at identical paths
(``--mount /lustre/x:/lustre/x``); the dry run lists recipe paths no mount covers.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from recipes.config import ExperimentConfig
from recipes.fileio import write_text_atomic

DEFAULT_CONTAINER_IMAGE = "nvcr.io/nvidia/nemo:24.12"
BRIDGE_CONTAINER_IMAGE = "nvcr.io/nvidia/nemo:26.02"  # --backend bridge: the FROM of Dockerfile.bridge
BRIDGE_MODULE = "recipes.bridge_backend"  # what every rank of --backend bridge runs: python -m BRIDGE_MODULE run ...
PROJECT_ROOT = Path(__file__).resolve().parents[1]
NO_CONTAINER = "none"  # --container-image none: the ranks run on the node itself (HOST_SRUN)
# NeMo-Run 0.3.0 writes every srun line for Pyxis: `--container-image IMG` (only with an image), always
# `--container-mounts ...,<job dir>:/nemo_run --container-workdir /nemo_run/code`, and the task's config
# as /nemo_run/configs/<name>_fn_or_script. Without Pyxis srun refuses those options, so with
# --container-image none the sbatch script (setup_lines, before the srun lines) defines this srun: it drops
# the container options and does what the mounts would do, by path: an argument under a mount's container
# path is rewritten to the host path (there is no other mount without a container: --mount is refused), and
# the container workdir becomes srun's --chdir.
HOST_SRUN = r"""# no container (recipes.launch.HOST_SRUN): NeMo-Run's Pyxis options become host paths
srun() {
    local args=() from=() to=() m i a s d
    while [ $# -gt 0 ]; do
        case "$1" in
            --container-image) shift 2 ;;
            --container-mounts)
                IFS=, read -ra m <<< "$2"
                for i in "${m[@]}"; do IFS=: read -r s d _ <<< "$i"; from+=("$d"); to+=("$s"); done
                shift 2 ;;
            --container-workdir) args+=(--chdir "$2"); shift 2 ;;
            *) args+=("$1"); shift ;;
        esac
    done
    for a in "${!args[@]}"; do
        for i in "${!from[@]}"; do
            case "${args[$a]}" in "${from[$i]}"|"${from[$i]}"/*) args[$a]="${to[$i]}${args[$a]#"${from[$i]}"}" ;; esac
        done
    done
    command srun "${args[@]}"
}"""
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
    them (the recipe's trainer is built from the config). ``gpus_per_node=0`` (the default for a CPU config,
    ``cfg.targets_gpu`` false) is a CPU job: ``train.num_devices`` tasks per node and no GPU, memory or
    exclusive-node request. ``tunnel`` is "local" (submitting from a login node; ``job_dir`` defaults to
    ``$NEMORUN_HOME`` (``~/.nemo_run``), where NeMo-Run's own commands find the experiment, and must be on
    storage the nodes share; the experiment dir is ``<job_dir>/experiments/<name>/<id>``, see
    :func:`experiment_base_dir`) or "ssh" (``ssh_host``,
    ``ssh_user`` and the remote ``job_dir`` required). ``packager`` "git" ships the committed code
    (``GitArchivePackager``), "none" expects it in the image or, with ``container_image="none"``, at the
    same path on the nodes as here. ``container_image="none"``: no container; the ranks run
    the submitting python (its bin dir is put first on ``PATH``) and the sbatch script's srun drops the
    Pyxis options (:data:`HOST_SRUN`).
    """
    import nemo_run as run

    if not account or not partition:
        raise LaunchError("--executor slurm needs --account and --partition")
    nodes = nodes or cfg.parallel.num_nodes
    gpus = (cfg.train.num_devices if cfg.targets_gpu else 0) if gpus_per_node is None else gpus_per_node
    if gpus < 0:
        raise LaunchError(f"--gpus-per-node {gpus}: expected 0 (a CPU job) or more")
    if nodes != cfg.parallel.num_nodes or gpus not in (0, cfg.train.num_devices):
        raise LaunchError(f"--nodes {nodes} --gpus-per-node {gpus} differ from the config's parallel.num_nodes="
                          f"{cfg.parallel.num_nodes} x train.num_devices={cfg.train.num_devices}; the trainer is built "
                          f"from the config, so override it instead (parallel.num_nodes={nodes} "
                          f"train.num_devices={gpus}), or give --gpus-per-node 0 for a CPU job")
    no_container = container_image in (None, "", NO_CONTAINER)
    if no_container and mounts:
        raise LaunchError(f"--mount {mounts[0]!r} with --container-image {NO_CONTAINER}: without a container "
                          "nothing is mounted; the paths must exist on the nodes as they are")
    if tunnel == "local":
        from nemo_run.config import NEMORUN_HOME
        base = Path(job_dir).absolute() if job_dir else Path(NEMORUN_HOME)
        # NeMo-Run 0.3.0 submits <tunnel job dir>/<name>/<id>/<job>_sbatch.sh but writes it into its experiment
        # dir, <base_dir>/experiments/<name>/<id>: they are one directory only when the tunnel's job_dir is
        # <base_dir>/experiments (run_with_executor creates the experiment with base_dir=experiment_base_dir()).
        # NeMo-Run reloads experiments (`nemo experiment status|logs|cancel ID`, Experiment.from_id) from
        # $NEMORUN_HOME/experiments only: the default keeps them there.
        tun = run.LocalTunnel(job_dir=str(base / "experiments"))
    elif tunnel == "ssh":
        if not (ssh_host and ssh_user and job_dir):
            raise LaunchError("--tunnel ssh needs --ssh-host, --ssh-user and --job-dir (a directory on the cluster)")
        tun = run.SSHTunnel(host=ssh_host, user=ssh_user, job_dir=job_dir)
    else:
        raise LaunchError(f"--tunnel {tunnel!r}: expected local or ssh")
    packagers = {"git": run.GitArchivePackager, "none": run.Packager}
    if packager not in packagers:
        raise LaunchError(f"--packager {packager!r}: expected one of {sorted(packagers)}")
    if gpus:
        executor = run.SlurmExecutor(
            account=account, partition=partition, tunnel=tun, nodes=nodes, ntasks_per_node=gpus, gpus_per_node=gpus,
            mem="0", exclusive=True, gres=f"gpu:{gpus}", time=time, packager=packagers[packager]())
    else:  # CPU job: one task per configured device (gloo), whatever GPUs the nodes have
        executor = run.SlurmExecutor(account=account, partition=partition, tunnel=tun, nodes=nodes,
                                     ntasks_per_node=cfg.train.num_devices, time=time, packager=packagers[packager]())
    env = dict(env_vars or {})
    if no_container:
        executor.container_image = None
        executor.container_mounts = []
        executor.setup_lines = HOST_SRUN
        # `python -m nemo_run.core.runners.fdl_runner` on every rank: this python (e.g. the project's venv,
        # not activated); $PATH is expanded on the node
        env = {"PATH": f"{Path(sys.executable).parent}:$PATH", **env}
    else:
        executor.container_image = container_image
        executor.container_mounts = _check_mounts(mounts)
    executor.env_vars = _env(env)
    return executor


def slurm_is_cpu(executor) -> bool:
    """True for the CPU job :func:`slurm_executor` builds with ``gpus_per_node=0`` (no GPU requested)."""
    return not executor.gpus_per_node and not executor.gres


def experiment_base_dir(executor) -> Optional[str]:
    """The NeMo-Run ``base_dir`` under which a local tunnel finds the experiment's files (None: NEMORUN_HOME)."""
    import nemo_run as run
    tunnel = getattr(executor, "tunnel", None)
    if isinstance(tunnel, run.LocalTunnel) and Path(tunnel.job_dir).name == "experiments":
        return str(Path(tunnel.job_dir).parent)
    return None


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
        from nemo_run.config import NEMORUN_HOME
        return text.replace(base, "$NEMORUN_HOME").replace(NEMORUN_HOME.rstrip("/") + "/", "$NEMORUN_HOME/")
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

    cpu = not cfg.targets_gpu
    if isinstance(executor, run.SlurmExecutor):
        cpu = slurm_is_cpu(executor)  # the job asks for GPUs or not (--gpus-per-node 0)
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
        if isinstance(executor, run.SlurmExecutor) and executor.container_image:
            missing = uncovered_paths(_recipe_paths(cfg), executor.container_mounts)
            if missing:
                parts.append("# WARNING: not mounted at the same path in the container (add --mount P:P): "
                             + ", ".join(missing))
    return "\n".join(parts), problems


# ---------------------------------------------------------------------------------------------
# command line (wired into recipes.finetune)


def add_executor_args(parser: argparse.ArgumentParser) -> None:
    """``--executor local|slurm`` and the Slurm options, in their own argument group."""
    g = parser.add_argument_group("NeMo-Run launch (--backend nemo or bridge)")
    g.add_argument("--executor", choices=["local", "slurm"],
                   help="run the NeMo recipe (or, with --backend bridge, `python -m recipes.bridge_backend run` in "
                        "the bridge's environment on every rank) through NeMo-Run: torchrun on this machine, or "
                        "sbatch on Slurm")
    g.add_argument("--nodes", type=int, help="Slurm nodes (default and required value: parallel.num_nodes)")
    g.add_argument("--gpus-per-node", type=int,
                   help="GPUs per node (default and required value: train.num_devices; for Slurm 0 is a CPU job, "
                        "one task per train.num_devices with the CPU recipe, the default for a CPU config)")
    g.add_argument("--account", help="Slurm account")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--time", default=DEFAULT_TIME, help="Slurm time limit (default: %(default)s)")
    g.add_argument("--container-image", default=None,
                   help=f"container for Slurm (Pyxis) (default: {DEFAULT_CONTAINER_IMAGE}, or your image built from "
                        f"Dockerfile.nemo; with --backend bridge {BRIDGE_CONTAINER_IMAGE}, or your image built from "
                        f"Dockerfile.bridge); '{NO_CONTAINER}': no container, the ranks run this python (its venv; "
                        "--backend bridge: the bridge's venv) and the code at the same paths on the nodes")
    g.add_argument("--mount", action="append", default=[], metavar="SRC:DST",
                   help="container mount, repeatable; mount model/data/output dirs at the same path")
    g.add_argument("--tunnel", choices=["local", "ssh"], default="local",
                   help="submit from this (login) node, or over SSH (default: %(default)s)")
    g.add_argument("--ssh-host", help="cluster login host (--tunnel ssh)")
    g.add_argument("--ssh-user", help="cluster user (--tunnel ssh)")
    g.add_argument("--job-dir", help="NeMo-Run job dir on the cluster, on storage the nodes share (default with "
                                     "--tunnel local: $NEMORUN_HOME, ~/.nemo_run, where NeMo-Run's commands look)")
    g.add_argument("--packager", choices=["git", "none"], default="git",
                   help="ship the committed code with the job (git), or use the code in the image (none; with "
                        f"--container-image {NO_CONTAINER}: the code at the same path on the nodes)")
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
                          gpus_per_node=args.gpus_per_node,
                          container_image=args.container_image or DEFAULT_CONTAINER_IMAGE, mounts=args.mount,
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
    slurm = isinstance(executor, run.SlurmExecutor)
    slurm_cpu = slurm and slurm_is_cpu(executor)
    if slurm_cpu:
        # a CPU job: the inputs (model dir from a preset, prepared data) and the NeMo import are made here, before
        # sbatch, as for the local executor; the ranks only read them (same paths on the nodes)
        from recipes.inputs import ensure_inputs
        ensure_inputs(cfg)
    if not (Path(cfg.model.hf_path) / "config.json").is_file():
        # the model section of the recipe is built from it here, on the submitting machine
        print(f"error: {cfg.model.hf_path}/config.json is not visible on this machine; the recipe is built here and "
              "used unchanged in the container, so the model dir must exist at the same path on both", file=sys.stderr)
        return 2
    cpu = slurm_cpu  # Slurm: what the job asked for (GPUs or not), whatever the submitting machine has
    if isinstance(executor, run.LocalExecutor):
        from recipes.inputs import ensure_inputs
        ensure_inputs(cfg)  # prepared data (model dirs are never built for production configs)
        cpu = cpu_shim.prepare_process()  # torchrun here: the ranks have what this machine has (gloo on a CPU)
        if shutil.which("torchrun") is None:  # NeMo-Run calls it by name: this python's, venv not activated
            os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        nemo_path = nemo_import.import_hf(cfg.model.hf_path, family=cfg.model.family)  # cached
    elif slurm_cpu:
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
    if not slurm:
        run.run(task, executor=executor, name=cfg.name, tail_logs=True)
        return 0
    return submit_slurm(task, executor, cfg.name, out)


def submit_slurm(task, executor, name: str, out: Path) -> int:
    """``task`` submitted with sbatch through NeMo-Run (returns once Slurm took it); ``<out>/slurm_job.json``."""
    import nemo_run as run
    # run.run(..., detach=True) as an Experiment of our own: its base_dir (see experiment_base_dir) and the
    # Slurm job id to report
    from nemo_run.config import NEMORUN_HOME
    os.makedirs(NEMORUN_HOME, exist_ok=True)  # NeMo-Run 0.3.0 appends the job to $NEMORUN_HOME/.slurm_jobs after sbatch
    with run.Experiment(name, executor=executor, base_dir=experiment_base_dir(executor)) as exp:
        exp.add(task, name=name, tail_logs=False)
        exp.run(detach=True)
    job = exp.jobs[0]
    job_id = str(job.handle).rstrip("/").rsplit("/", 1)[-1]
    ex = job.executor
    log = str(ex.job_details.srun_stdout).replace("%j", job_id).replace("${SLURM_RESTART_COUNT:-0}", "0")
    write_text_atomic(out / "slurm_job.json", json.dumps(
        {"job_id": job_id, "experiment_id": exp._id, "handle": str(job.handle), "log": log,
         "batch_log": str(ex.job_details.stdout).replace("%j", job_id),
         "sbatch_script": str(Path(ex.tunnel.job_dir) / f"{ex.job_name}_sbatch.sh")}, indent=2) + "\n")
    print(f"submitted: Slurm job {job_id} (NeMo-Run experiment {exp._id}); its log on the cluster: {log} "
          f"(`squeue -j {job_id}`, `scontrol show job {job_id}`); {out / 'slurm_job.json'}")
    return 0


# ---------------------------------------------------------------------------------------------
# --backend bridge: `python -m recipes.bridge_backend run` on every rank, in the bridge's environment


def bridge_run_args(cfg: ExperimentConfig, config: str | Path, overrides: Sequence[str] = ()) -> list[str]:
    """``run --config <abs config> [overrides] model.hf_path=<abs> data.dataset_dir=<abs> output_dir=<abs>``:
    the arguments after ``python -m recipes.bridge_backend``. The paths are resolved here, on the launching
    machine (a Slurm task starts in NeMo-Run's job dir, not here), and must exist at the same paths on the
    nodes/in the container."""
    paths = {"model.hf_path": cfg.model.hf_path, "data.dataset_dir": cfg.data.dataset_dir}
    if cfg.data.source:
        paths["data.source"] = cfg.data.source
    paths["output_dir"] = cfg.output_dir
    return ["run", "--config", str(Path(config).absolute()), *overrides,
            *(f"{k}={Path(v).absolute()}" for k, v in paths.items())]


def bridge_task(cfg: ExperimentConfig, config: str | Path, overrides: Sequence[str] = (), python: str = "python"):
    """``run.Script`` of ``<python> -m recipes.bridge_backend run ...`` (:func:`bridge_run_args`). Under the
    torchrun launcher NeMo-Run turns it into ``torchrun ... -m recipes.bridge_backend run ...`` (the ``torchrun``
    first on ``PATH`` runs its own python); as a Slurm task it is ``<python> -m recipes.bridge_backend run ...``."""
    import nemo_run as run
    return run.Script(path=BRIDGE_MODULE, m=True, entrypoint=python, args=bridge_run_args(cfg, config, overrides))


def _bridge_python_or_error() -> Path:
    from recipes.bridge_recipe import bridge_python
    try:
        return bridge_python()
    except FileNotFoundError as e:
        raise LaunchError(str(e)) from None


def build_bridge_executor(args: argparse.Namespace, cfg: ExperimentConfig):
    """(executor, python of the ranks, bridge python here or None) for ``--backend bridge --executor ...``.

    Local: :func:`local_executor` with the bridge venv's bin dir first on the ranks' ``PATH`` (its ``torchrun``,
    hence its python, run the ranks) and this checkout on ``PYTHONPATH``. Slurm: :func:`slurm_executor` with
    ``--container-image`` defaulting to :data:`BRIDGE_CONTAINER_IMAGE` (its python has Megatron-Bridge: the
    tasks run ``python``); ``none``: the tasks run the bridge venv's python by path, this checkout on
    ``PYTHONPATH`` (the code at the same path on the nodes, as for ``--backend nemo``)."""
    env = _parse_env(args.env)
    if args.executor == "local":
        if args.nodes not in (None, 1):
            raise LaunchError(f"--nodes {args.nodes}: the local executor runs on this machine only")
        py = _bridge_python_or_error()
        pythonpath = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {"PATH": str(py.parent), "PYTHONPATH": pythonpath, **env}
        return local_executor(cfg, env_vars=env, ntasks_per_node=args.gpus_per_node), str(py), py
    image = args.container_image or BRIDGE_CONTAINER_IMAGE
    no_container = image in ("", NO_CONTAINER)
    py = None
    if no_container:
        py = _bridge_python_or_error()
        env = {"PATH": f"{py.parent}:$PATH", "PYTHONPATH": f"{PROJECT_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}", **env}
    else:
        with contextlib.suppress(LaunchError):  # here only for the dry run's ConfigContainer and a CPU job's inputs
            py = _bridge_python_or_error()
    ex = slurm_executor(cfg, account=args.account, partition=args.partition, nodes=args.nodes,
                        gpus_per_node=args.gpus_per_node, container_image=image, mounts=args.mount, time=args.time,
                        tunnel=args.tunnel, ssh_host=args.ssh_host, ssh_user=args.ssh_user, job_dir=args.job_dir,
                        packager=args.packager, env_vars=env)
    return ex, (str(py) if no_container else "python"), py


def _bridge_child_env() -> dict[str, str]:
    """This environment without torchrun's rank variables (a child bridge process is a run of its own)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}


def ensure_bridge_base(cfg: ExperimentConfig, py: Path) -> Path:
    """The bridge's base checkpoint (``<hf_path>-megatron``) made here before the launch, by
    ``<bridge python> -m recipes.bridge_backend import HF_DIR``, so the ranks only read it. Always asked of the
    bridge's python (about a second when cached): only there does the cache check see the bridge's versions."""
    import subprocess
    from recipes.bridge_recipe import default_base_path
    subprocess.run([str(py), "-m", BRIDGE_MODULE, "import", str(Path(cfg.model.hf_path).absolute())],
                   check=True, cwd=PROJECT_ROOT, env=_bridge_child_env())
    return default_base_path(cfg.model.hf_path)


def _bridge_paths(cfg: ExperimentConfig, config: str | Path) -> list[str]:
    from recipes.bridge_recipe import default_base_path
    return [str(Path(config).absolute()), str(Path(cfg.model.hf_path).absolute()),
            str(default_base_path(cfg.model.hf_path)), str(Path(cfg.data.dataset_dir).absolute()),
            str(Path(cfg.output_dir).absolute())]


def bridge_dry_run(args: argparse.Namespace, cfg: ExperimentConfig, executor, ranks_python: str,
                   py: Optional[Path]) -> int:
    """The bridge's own dry run (its resolved ConfigContainer, in its environment), then the command or sbatch
    script NeMo-Run would launch (:func:`executor_script`). Writes nothing."""
    import subprocess
    import nemo_run as run
    rc = 0
    if py is not None:
        r = subprocess.run([str(py), "-m", BRIDGE_MODULE, *bridge_run_args(cfg, args.config, args.overrides),
                            "--dry-run"], cwd=PROJECT_ROOT, env=_bridge_child_env(), capture_output=True, text=True)
        print(r.stdout, end="")
        if r.returncode:
            print(r.stderr[-5000:], end="", file=sys.stderr)
        rc = r.returncode
    else:
        print("# the Megatron-Bridge environment is not here: the ConfigContainer is not shown (the container's "
              "python resolves it at launch; `make bridge-install` to see it here)")
    task = bridge_task(cfg, args.config, args.overrides, python=ranks_python)
    print("")
    print(f"# executor: {type(executor).__name__}; every rank runs {ranks_python} -m {BRIDGE_MODULE}"
          + (f" (the torchrun of {Path(py).parent})" if isinstance(executor, run.LocalExecutor) else ""))
    script = executor_script(task, executor, name=cfg.name)
    print(script, end="" if script.endswith("\n") else "\n")
    if isinstance(executor, run.SlurmExecutor) and executor.container_image:
        missing = uncovered_paths(_bridge_paths(cfg, args.config), executor.container_mounts)
        if missing:
            print("# WARNING: not mounted at the same path in the container (add --mount P:P): " + ", ".join(missing))
    return rc


def run_bridge_with_executor(args: argparse.Namespace, cfg: ExperimentConfig) -> int:
    """``--backend bridge --executor local|slurm``: the dry run (:func:`bridge_dry_run`), or the inputs and the
    base checkpoint made here (local, or a Slurm CPU job: the submitting machine builds them, the ranks read them)
    and the launch. Local: waits and returns 0 when NeMo-Run's job succeeded, 1 otherwise. Slurm: returns once
    sbatch took the job (``<output_dir>/slurm_job.json``). 2: bad launch options."""
    import nemo_run as run
    try:
        executor, ranks_python, py = build_bridge_executor(args, cfg)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return bridge_dry_run(args, cfg, executor, ranks_python, py)
    slurm = isinstance(executor, run.SlurmExecutor)
    task = bridge_task(cfg, args.config, args.overrides, python=ranks_python)
    out = Path(cfg.output_dir).absolute()
    if not slurm or slurm_is_cpu(executor):
        from recipes.inputs import ensure_inputs
        try:
            py = py or _bridge_python_or_error()
        except LaunchError as e:
            print(f"error: a CPU job's inputs and base checkpoint are made here, before sbatch, by the bridge's "
                  f"python: {e}", file=sys.stderr)
            return 2
        ensure_inputs(cfg)
        ensure_bridge_base(cfg, py)
    else:
        from recipes.bridge_backend import import_is_complete
        from recipes.bridge_recipe import default_base_path
        base = default_base_path(cfg.model.hf_path)
        if not import_is_complete(cfg.model.hf_path, base):
            print(f"note: {base} is not there yet: rank 0 makes it at the start of the job (the others wait); or "
                  f"run `python -m {BRIDGE_MODULE} import {Path(cfg.model.hf_path).absolute()}` in the container first")
    write_text_atomic(out / "bridge_launch.txt", " ".join([ranks_python, "-m", BRIDGE_MODULE, *task.args]) + "\n")
    if slurm:
        return submit_slurm(task, executor, cfg.name, out)
    with run.Experiment(cfg.name, executor=executor) as exp:
        exp.add(task, name=cfg.name, tail_logs=True)
        exp.run(detach=False)
    state = exp.jobs[0].state
    if str(getattr(state, "name", state)) != "SUCCEEDED":
        print(f"error: the NeMo-Run job of {cfg.name} ended {getattr(state, 'name', state)}", file=sys.stderr)
        return 1
    return 0

