"""Reject a NeMo config that cannot divide or cannot fit, before a GPU is involved.

    python -m recipes.validate nemo_configs/swallow_70b_lora.yaml [more.yaml ...] [--gpu-memory-gb 80] \\
        [parallel.tensor_model_parallel_size=4 ...]

:func:`validate` returns every problem it finds, each naming the numbers involved, e.g.
``num_query_groups 8 is not divisible by tensor_model_parallel_size 16``; :func:`check` raises
:class:`~recipes.config.ConfigError` with all of them; :func:`warnings` lists what is legal but worth
knowing (vocabulary padding, importer limits, TP across nodes). The command prints, per config, the
model shape, the layout, the per-GPU memory estimate of :mod:`recipes.memory` by pipeline stage and
the verdict; exit status 0 when every config passes, 1 when one has problems, 2 when one cannot be read.

Checks (megatron-core 0.10 / NeMo 2.1 rules):

- the HF dir, when downloaded, holds the model the config is named after (layers, hidden, heads, vocab...);
- world size (GPUs per node x nodes) divisible by TP x PP x CP;
- attention heads, query groups, hidden and FFN sizes divisible by TP;
- layers divisible by PP, and by PP x VP with the interleaved schedule; VP needs PP > 1 and a number of
  micro-batches per step that is a multiple of PP (``schedules.py``: microbatch_group_size_per_vp_stage);
- vocabulary: Megatron pads it to a multiple of make_vocab_size_divisible_by x TP (reported), while
  NeMo's Qwen2 config fixes it, so it must divide by TP;
- global batch divisible by micro-batch x DP;
- context parallelism: sequence length divisible by 2 x CP (load-balanced causal split);
- sequence parallelism needs TP > 1, and the per-GPU sequence divisible by TP;
- packed sequences need micro-batch 1;
- the estimated peak of the fullest pipeline stage fits the GPU memory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recipes.config import ConfigError, ExperimentConfig, load_config
from recipes.data import count_prepared
from recipes.memory import GIB, Architecture, Layout, MemoryEstimate, estimate, resolve_architecture, with_layout

DEFAULT_GPU_MEMORY_GB = 80.0  # H100 SXM 80GB (GiB, as recipes.memory reports)


def _divides(problems: list[str], what: str, value: int, by_name: str, by: int, why: str = "") -> None:
    if by > 0 and value % by:
        problems.append(f"{what} {value} is not divisible by {by_name} {by}" + (f" ({why})" if why else ""))


def shape_problems(arch: Architecture, cfg: ExperimentConfig) -> list[str]:
    """Divisibility of the model over TP / PP / VP."""
    p = cfg.parallel
    tp, pp, vp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    out: list[str] = []
    _divides(out, "num_attention_heads", arch.num_attention_heads, "tensor_model_parallel_size", tp)
    _divides(out, "num_query_groups (KV heads)", arch.num_query_groups, "tensor_model_parallel_size", tp,
             "each TP rank needs whole KV groups")
    _divides(out, "hidden_size", arch.hidden_size, "tensor_model_parallel_size", tp)
    _divides(out, "ffn_hidden_size", arch.ffn_hidden_size, "tensor_model_parallel_size", tp)
    if vp:
        _divides(out, "num_layers", arch.num_layers, "PP x VP =", pp * vp,
                 f"{pp} pipeline stages x {vp} virtual chunks each need the same number of layers")
    else:
        _divides(out, "num_layers", arch.num_layers, "pipeline_model_parallel_size", pp)
    if arch.vocab_is_preset:
        _divides(out, f"vocab_size (fixed by NeMo's {arch.family} config, not padded)", arch.vocab_size,
                 "tensor_model_parallel_size", tp)
    return out


def layout_problems(cfg: ExperimentConfig) -> list[str]:
    """Checks that need only the config (world size, batch, CP, SP, VP schedule, packing)."""
    p, t = cfg.parallel, cfg.train
    tp, pp, cp, vp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                      p.virtual_pipeline_model_parallel_size)
    out: list[str] = []
    world, mp = cfg.world_size, tp * pp * cp
    if world % mp:
        out.append(f"world size {world} (train.num_devices={t.num_devices} x parallel.num_nodes={p.num_nodes}) is "
                   f"not divisible by TP x PP x CP = {tp} x {pp} x {cp} = {mp}")
    dp = max(1, world // mp)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        out.append(f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x data-parallel "
                   f"size = {t.micro_batch_size} x {dp} = {per_step}")
    n = t.global_batch_size // per_step if per_step else 0
    if vp is not None:
        if pp <= 1:
            out.append(f"parallel.virtual_pipeline_model_parallel_size={vp} needs pipeline_model_parallel_size > 1 "
                       f"(got {pp})")
        elif n < pp or n % pp:
            out.append(f"the interleaved pipeline schedule (VP={vp}) needs the micro-batches per step, "
                       f"global_batch_size / (micro_batch_size x DP) = {t.global_batch_size} / ({t.micro_batch_size} x "
                       f"{dp}) = {n}, to be a positive multiple of PP={pp}")
    if cp > 1 and t.seq_length % (2 * cp):
        out.append(f"train.seq_length={t.seq_length} is not divisible by 2 x context_parallel_size = {2 * cp} "
                   "(causal context parallelism splits each sequence into 2 x CP chunks)")
    if p.sequence_parallel:
        if tp <= 1:
            out.append(f"parallel.sequence_parallel=true needs tensor_model_parallel_size > 1 (got {tp})")
        elif (t.seq_length // cp) % tp:
            out.append(f"sequence parallelism splits the per-GPU sequence seq_length / CP = {t.seq_length // cp} over "
                       f"TP={tp}: it is not divisible")
    if t.packed_sequence and t.micro_batch_size != 1:
        out.append(f"train.packed_sequence=true needs train.micro_batch_size=1 (NeMo packs several pairs into one "
                   f"row), got {t.micro_batch_size}")
    return out


def memory_problem(est: MemoryEstimate, gpu_memory_gb: float) -> list[str]:
    """The estimate against the GPU, with its breakdown and (when it helps) what full recompute would give."""
    if est.fits(gpu_memory_gb):
        return []
    s = est.peak
    msg = (f"estimated peak {s.total / GIB:.1f} GiB per GPU on pipeline stage {s.stage} (weights {s.weights / GIB:.1f} + "
           f"grads {s.grads / GIB:.1f} + optimizer {s.optimizer / GIB:.1f} + activations {s.activations / GIB:.1f} + "
           f"logits {s.logits / GIB:.1f} + overhead {s.overhead / GIB:.1f}) exceeds {gpu_memory_gb:g} GiB")
    hints = []
    if not est.layout.recompute:
        alt = estimate(est.arch, with_layout(est.layout, recompute=True))
        hints.append(f"train.activation_checkpointing=true: {alt.total_gib:.1f} GiB")
    if est.layout.method == "sft" and not est.layout.distributed_optimizer and est.layout.dp * est.layout.cp > 1:
        alt = estimate(est.arch, with_layout(est.layout, distributed_optimizer=True))
        hints.append(f"parallel.use_distributed_optimizer=true: {alt.total_gib:.1f} GiB")
    if hints:
        msg += "; " + ", ".join(hints)
    return [msg]


def validate(cfg: ExperimentConfig, gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB) -> list[str]:
    """Every reason ``cfg`` cannot run (cannot divide or cannot fit), each with its numbers; [] when it can."""
    problems = layout_problems(cfg)
    try:
        arch, _ = resolve_architecture(cfg)
    except (LookupError, ValueError, KeyError) as e:
        return problems + [str(e).strip("'\"")]
    problems += shape_problems(arch, cfg)
    problems += memory_problem(estimate(arch, Layout.from_config(cfg)), gpu_memory_gb)
    return problems


def check(cfg: ExperimentConfig, gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB) -> None:
    """Raise ConfigError listing every problem :func:`validate` finds."""
    problems = validate(cfg, gpu_memory_gb)
    if problems:
        raise ConfigError(f"config {cfg.name!r}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


def validation_warning(cfg: ExperimentConfig) -> list[str]:
    """What validation covers of a prepared ``validation.jsonl`` (every backend evaluates the first
    ``TrainConfig.validation_batches`` whole global batches): nothing, or not every row."""
    t = cfg.train
    path = Path(cfg.data.dataset_dir) / "validation.jsonl"
    rows = count_prepared(path)
    if not rows or not t.limit_val_batches:
        return []
    batches = t.validation_batches(rows)
    if batches == 0:
        return [f"{path}: {rows} rows, less than one global batch ({t.global_batch_size}): no backend validates"]
    if rows > batches * t.global_batch_size:
        return [f"{path}: validation covers {batches * t.global_batch_size} of its {rows} rows ({batches} global "
                f"batch(es) of {t.global_batch_size}, train.limit_val_batches={t.limit_val_batches}; whole batches only)"]
    return []


def warnings(cfg: ExperimentConfig) -> list[str]:
    """Legal settings worth knowing about before a long run."""
    out: list[str] = validation_warning(cfg)
    p = cfg.parallel
    try:
        arch, _ = resolve_architecture(cfg)
    except (LookupError, ValueError, KeyError):
        return out
    tp = p.tensor_model_parallel_size
    padded = arch.padded_vocab(tp)
    if padded != arch.vocab_size:
        out.append(f"vocab {arch.vocab_size} is padded to {padded} rows (multiple of {arch.make_vocab_size_divisible_by}"
                   f" x TP{tp}); exported checkpoints must cut it back to {arch.vocab_size}")
    importer_vocab = arch.spec.nemo_importer_vocab()
    if importer_vocab is not None and arch.vocab_size != importer_vocab:
        out.append(f"vocab {arch.vocab_size}: NeMo 2.1.0's own {arch.family} importer (llm.import_ckpt) assumes "
                   f"{importer_vocab} (fixed in 2.2.0); import with `python -m recipes.nemo_backend import "
                   f"HF_DIR --family {arch.family}`, which keeps the real vocab")
    if tp > cfg.train.num_devices:
        out.append(f"TP={tp} is larger than the GPUs per node ({cfg.train.num_devices}): tensor parallelism across "
                   "nodes is slow")
    if cfg.train.seq_length > arch.max_position_embeddings:
        out.append(f"train.seq_length={cfg.train.seq_length} exceeds the model's max_position_embeddings "
                   f"{arch.max_position_embeddings}")
    if cfg.method == "lora" and p.use_distributed_optimizer and cfg.data_parallel_size > 1:
        out.append("LoRA with the distributed optimizer: NeMo's LoRA recipes turn it off (the adapter states are tiny)")
    return out


def report(cfg: ExperimentConfig, gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB, source: str = "") -> tuple[str, list[str]]:
    """(text for the command line, problems) for one config."""
    lines = [f"== {source or cfg.name}: {cfg.name} ({cfg.method}) =="]
    problems = layout_problems(cfg)
    try:
        arch, where = resolve_architecture(cfg)
    except (LookupError, ValueError, KeyError) as e:
        problems.append(str(e).strip("'\""))
        arch = None
    if arch is not None:
        problems += shape_problems(arch, cfg)
        layout = Layout.from_config(cfg)
        est = estimate(arch, layout)
        problems += memory_problem(est, gpu_memory_gb)
        lines += [f"model:  {where}", f"        {arch.summary()}",
                  f"layout: {layout.describe()}",
                  f"        {cfg.world_size} GPUs = {cfg.parallel.num_nodes} node(s) x {cfg.train.num_devices}",
                  est.table(),
                  f"peak:   {est.total_gib:.1f} GiB of {gpu_memory_gb:g} GiB per GPU (pipeline stage {est.peak.stage})"]
        lines += [f"note:   {w}" for w in warnings(cfg)]
    lines.append("OK" if not problems else "PROBLEMS:\n  - " + "\n  - ".join(problems))
    return "\n".join(lines), problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recipes.validate", description=__doc__.split("\n\n")[0],
                                 epilog="Memory model and its sources: recipes/memory.py.")
    ap.add_argument("items", nargs="+", metavar="CONFIG|key=value",
                    help="experiment YAMLs, then optional key=value overrides applied to each")
    ap.add_argument("--gpu-memory-gb", type=float, default=DEFAULT_GPU_MEMORY_GB,
                    help="usable memory per GPU in GiB (default: %(default)s, an H100 80GB)")
    args = ap.parse_args(argv)
    overrides = [i for i in args.items if "=" in i]
    paths = [i for i in args.items if "=" not in i]
    if not paths:
        ap.error("no config given")
    status = 0
    for path in paths:
        try:
            cfg = load_config(path, overrides)
        except ConfigError as e:
            print(f"== {path} ==\nerror: {e}", file=sys.stderr)
            status = 2
            continue
        text, problems = report(cfg, args.gpu_memory_gb, source=str(Path(path)))
        print(text + "\n")
        if problems and status == 0:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
