"""NeMo 2.1 backend: ExperimentConfig -> a NeMo-Run ``run.Partial`` of ``llm.finetune``, run in-process.

Torchtune-style: small functions, each taking only the config node it needs:

- :func:`import_hf` — HF dir -> NeMo 2 checkpoint with the project's streaming converter
  (``convert.hf_to_nemo``; ``importer="nemo"``: NeMo's own ``llm.import_ckpt`` for Llama or a fixed copy
  of the 2.1.0 Qwen2 importer), cached beside the HF dir (``<hf_path>-nemo``), written to a temp dir
  and renamed, with a marker naming the source files;
- :func:`import_logits_check` — the imported checkpoint's logits against the HF model's (CPU, fp32);
- :func:`build_recipe` — ``run.Partial(llm.finetune, model=, data=, trainer=, log=, optim=, peft=,
  resume=)`` built from :func:`model_config`, :func:`data_config`, :func:`trainer_config`,
  :func:`optim_config`, :func:`peft_config`, :func:`log_config`, :func:`resume_config`;
- :func:`optimizer_settings` — the resolved hyperparameters, compared field by field with
  ``recipes.hf_backend.training_arguments`` by the tests;
- :func:`describe` — the recipe for ``--dry-run`` (needs neither the model nor a GPU);
- :class:`MetricsCallback` — ``metrics.jsonl`` through ``benchmarks.metrics.StepTimer``;
- :func:`run` — CPU shim when there is no CUDA, import, build, run; returns the last checkpoint.

On a CPU (no CUDA) :mod:`recipes.cpu_shim` is applied and the recipe uses gloo, fp32, no fused
kernels, ``num_workers=0``, synchronous checkpointing and no distributed optimizer; the
``cpu = not torch.cuda.is_available()`` flag chooses those settings, nothing else does.

Known differences from the HF baseline (same config values, different formulas in the libraries):
NeMo's warmup gives step ``s`` (0-based) ``lr*(s+1)/(warmup+1)`` where HF gives ``lr*s/warmup``
(identical after warmup); NeMo's training loss is the mean of the micro-batches' per-token means,
HF's is the per-token mean over the whole global batch.
"""
from __future__ import annotations

import os

# Nothing here may reach a model hub; must be set before transformers/huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Callback

from convert.nemo_ckpt import read_dist_tensors
from recipes.fileio import write_text_atomic
from recipes.config import ExperimentConfig, LoraConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig

# config precision -> MegatronMixedPrecision(precision=...)
NEMO_PRECISION = {"fp32": "32", "bf16-mixed": "bf16-mixed", "fp16-mixed": "16-mixed"}
# config scheduler -> nemo.lightning.pytorch.optim scheduler class (same shapes as HF_SCHEDULERS)
NEMO_SCHEDULERS = {"cosine": "CosineAnnealingScheduler", "linear": "WarmupAnnealingScheduler",
                   "constant": "WarmupPolicyScheduler"}
# GPTSFTDataset settings that make NeMo build exactly the token ids of recipes.tokens.tokenize_pair:
# "input" already ends with the chat template's assistant header, so no space between the fields.
SFT_DATASET_KWARGS = {"prompt_template": "{input}{output}", "label_key": "output", "truncation_field": "input",
                      "truncation_method": "right", "add_bos": False, "add_eos": True, "add_sep": False,
                      "answer_only_loss": True}
IMPORT_MARKER = "nemo_import.json"  # written last into a complete imported checkpoint
CHECKPOINT_SUBDIR = "nemo"  # NeMoLogger name: checkpoints go to <output_dir>/nemo/checkpoints/


def is_cpu() -> bool:
    import torch
    return not torch.cuda.is_available()


def prepare_process(cpu: Optional[bool] = None, exclude_patches: tuple[str, ...] = ()) -> bool:
    """Environment for NeMo in this process; applies the CPU shim when there is no CUDA (all patches but
    ``exclude_patches``, which only tests use). Returns cpu."""
    cpu = is_cpu() if cpu is None else cpu
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # single-node torch.distributed rendezvous
    # torch >= 2.6 loads with weights_only=True; NeMo 2.1 checkpoints (common.pt) pickle pathlib
    # paths, so resuming fails with "Unsupported global: GLOBAL pathlib.PosixPath" without this.
    import pathlib

    import torch
    torch.serialization.add_safe_globals([pathlib.PosixPath, pathlib.Path])
    from recipes import cpu_shim
    if cpu:
        cpu_shim.apply(exclude=exclude_patches)
    else:
        cpu_shim.apply_compat(exclude=exclude_patches)
    return cpu


# ---------------------------------------------------------------------------------------------
# HF -> NeMo import


def _hf_config(hf_path: str | Path) -> dict:
    p = Path(hf_path) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not found (model.hf_path must be a Hugging Face model directory)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON ({e})") from None


def _check_family(hf_path: str | Path, family: str) -> dict:
    hf = _hf_config(hf_path)
    want = {"llama": "llama", "qwen2": "qwen2"}[family]
    if hf.get("model_type") != want:
        raise ValueError(f"{hf_path}/config.json: model_type {hf.get('model_type')!r} does not match "
                         f"model.family={family!r}")
    rs = hf.get("rope_scaling")
    if rs and rs.get("rope_type", rs.get("type")) != "llama3":
        raise NotImplementedError(f"{hf_path}/config.json: rope_scaling {rs} is not supported by the NeMo 2.1 import")
    return hf


def default_nemo_path(hf_path: str | Path) -> Path:
    """Where :func:`import_hf` caches the NeMo checkpoint of ``hf_path``: the sibling ``<hf_path>-nemo``."""
    p = Path(hf_path).absolute()
    return p.parent / f"{p.name}-nemo"


def _source_fingerprint(hf_path: Path) -> dict:
    """Names, sizes and sha256 of the HF files an import reads (weights hashed by size+mtime only)."""
    files = {}
    for f in sorted(hf_path.iterdir()):
        if not f.is_file():
            continue
        st = f.stat()
        if f.suffix in (".json", ".model", ".txt", ".jinja"):
            files[f.name] = {"size": st.st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        elif f.suffix in (".safetensors", ".bin"):
            files[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return files


def import_is_complete(hf_path: str | Path, nemo_path: str | Path, importer: str = "convert") -> bool:
    """True when ``nemo_path`` holds a finished import of the current files of ``hf_path`` by ``importer``."""
    marker = Path(nemo_path) / IMPORT_MARKER
    if not marker.is_file() or not (Path(nemo_path) / "weights").is_dir() or not (Path(nemo_path) / "context").is_dir():
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return (info.get("norm_check", {}).get("norms_equal") is True and info.get("importer") == importer
            and info.get("source_files") == _source_fingerprint(Path(hf_path).absolute()))


def _model_class(family: str):
    from nemo.collections import llm
    return {"llama": llm.LlamaModel, "qwen2": llm.Qwen2Model}[family]


IMPORTERS = ("convert", "nemo")


def import_hf(hf_path: str | Path, nemo_path: str | Path | None = None, family: str = "llama",
              check_norms: bool = True, importer: str = "convert") -> Path:
    """HF model dir -> NeMo 2 checkpoint dir (``context/`` + ``weights/``); returns its path.

    ``importer="convert"`` (default): ``convert.hf_to_nemo``, one layer at a time, the same tensors as
    NeMo's importer, and it also handles what 2.1.0's importers get wrong (Llama 3.1 rope_scaling,
    Qwen2.5-72B's vocab, tied Qwen2). ``"nemo"``: NeMo's own ``llm.import_ckpt`` (Llama) / the fixed
    Qwen2 importer; on a CPU it needs :mod:`recipes.cpu_shim` (:func:`prepare_process` applies it):
    its converter patch is what keeps the norm weights.
    Skipped when ``nemo_path`` (default :func:`default_nemo_path`) already holds a complete import of
    the same source files by the same importer. Otherwise the import is written to a temp dir beside
    it, checked (the layer-norm weights must be the HF ones, see :func:`check_imported_norms`), marked
    complete and renamed into place. ``check_norms=False`` skips that check (only for demonstrating
    what the logits check catches).
    """
    if importer not in IMPORTERS:
        raise ValueError(f"importer {importer!r}: expected one of {', '.join(IMPORTERS)}")
    hf_path = Path(hf_path).absolute()
    hf = _check_family(hf_path, family)
    dest = Path(nemo_path).absolute() if nemo_path else default_nemo_path(hf_path)
    if import_is_complete(hf_path, dest, importer):
        return dest
    from nemo.collections import llm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp = tmp_root / dest.name
    try:
        t0 = time.perf_counter()
        if importer == "convert":
            from convert.hf_to_nemo import convert as hf_to_nemo
            hf_to_nemo(hf_path, tmp, progress=False)
        elif family == "qwen2":
            _qwen2_importer(hf_path)(output_path=tmp)
        else:
            # The importer builds the model config from the HF config.json; the model passed here only
            # selects the importer (its placeholder config must merely be valid).
            placeholder = llm.LlamaConfig(num_layers=1, hidden_size=64, num_attention_heads=1)
            llm.import_ckpt(model=llm.LlamaModel(placeholder), source=f"hf://{hf_path}", output_path=tmp)
        seconds = round(time.perf_counter() - t0, 2)
        try:
            norms = check_imported_norms(hf_path, tmp) if check_norms else {"norms_equal": "not checked"}
        except RuntimeError as e:
            raise RuntimeError(str(e).replace(str(tmp), str(dest))) from None
        info = {"source": str(hf_path), "family": family, "model_type": hf.get("model_type"), "importer": importer,
                "source_files": _source_fingerprint(hf_path), "seconds": seconds, "norm_check": norms}
        (tmp / IMPORT_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if dest.exists():  # stale or half-written: replace it
            old = tmp_root / f"{dest.name}.old"
            dest.rename(old)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return dest


def _qwen2_importer(hf_path: Path):
    """NeMo 2.1.0's HF Qwen2 importer with the two fixes of 2.2.0: it hard-codes vocab_size=151936 and
    untied embeddings, so Qwen2.5-72B (vocab 152064) fails on the embedding shape and the small tied
    Qwen2.5 models on the missing output layer. Used directly instead of through llm.import_ckpt
    (which would pick the registered, unfixed importer)."""
    from nemo.collections.llm.gpt.model import qwen2
    from nemo.lightning import io

    class Qwen2Importer(qwen2.HFQwen2Importer):
        @property
        def config(self):
            # upstream's config plus vocab_size and tying, built in one call: the checkpoint context
            # records the constructor arguments, not attributes set afterwards
            import torch
            from nemo.lightning.pytorch.utils import dtype_from_hf
            from transformers import AutoConfig
            source = AutoConfig.from_pretrained(str(self))
            dtype = dtype_from_hf(source)
            return qwen2.Qwen2Config(
                num_layers=source.num_hidden_layers, hidden_size=source.hidden_size,
                ffn_hidden_size=source.intermediate_size, num_attention_heads=source.num_attention_heads,
                num_query_groups=source.num_key_value_heads, init_method_std=source.initializer_range,
                layernorm_epsilon=source.rms_norm_eps, gated_linear_unit=True, make_vocab_size_divisible_by=128,
                rotary_base=source.rope_theta, vocab_size=source.vocab_size,
                share_embeddings_and_output_weights=bool(getattr(source, "tie_word_embeddings", False)),
                fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16, params_dtype=dtype)

        def convert_state(self, source, target):
            # upstream's mapping; without lm_head when the embeddings are tied (as HFLlamaImporter does)
            mapping = {
                "model.embed_tokens.weight": "embedding.word_embeddings.weight",
                "model.layers.*.self_attn.o_proj.weight": "decoder.layers.*.self_attention.linear_proj.weight",
                "model.layers.*.mlp.down_proj.weight": "decoder.layers.*.mlp.linear_fc2.weight",
                "model.layers.*.input_layernorm.weight": "decoder.layers.*.self_attention.linear_qkv.layer_norm_weight",
                "model.layers.*.post_attention_layernorm.weight": "decoder.layers.*.mlp.linear_fc1.layer_norm_weight",
                "model.norm.weight": "decoder.final_layernorm.weight",
                "lm_head.weight": "output_layer.weight",
            }
            if getattr(source.config, "tie_word_embeddings", False):
                del mapping["lm_head.weight"]
            return io.apply_transforms(source, target, mapping=mapping,
                                       transforms=[qwen2._import_qkv, qwen2._import_qkv_bias, qwen2._import_linear_fc1])

    return Qwen2Importer(str(hf_path))


def check_imported_norms(hf_path: str | Path, nemo_path: str | Path) -> dict:
    """Require every RMSNorm weight of the import to equal the HF one; returns a small report.

    The 2.1.0 importer maps norms by Transformer-Engine names; with the local (non-TE) layer spec
    it SILENTLY leaves them at their init value 1.0 (the model still loads and runs). This catches it.
    """
    import torch
    from safetensors.torch import load_file

    hf_path, weights = Path(hf_path), Path(nemo_path) / "weights"
    hf_sd = {}
    for f in sorted(hf_path.glob("*.safetensors")):
        hf_sd.update({k: v for k, v in load_file(str(f)).items() if "norm" in k})
    if not hf_sd:
        raise FileNotFoundError(f"{hf_path}: no norm weights in *.safetensors")
    n_layers = 1 + max(int(k.split(".")[2]) for k in hf_sd if k.startswith("model.layers."))
    # The dist checkpoint always uses the TE-fused names: megatron's local layer spec maps
    # input_layernorm/pre_mlp_layernorm onto them in its sharded_state_dict.
    pairs = {"input_layernorm": "module.decoder.layers.self_attention.linear_qkv.layer_norm_weight",
             "post_attention_layernorm": "module.decoder.layers.mlp.linear_fc1.layer_norm_weight"}
    got = read_dist_tensors(weights, [*pairs.values(), "module.decoder.final_layernorm.weight"])
    bad = []
    for hf_name, key in pairs.items():
        for i in range(n_layers):
            if not torch.equal(got[key][i].float(), hf_sd[f"model.layers.{i}.{hf_name}.weight"].float()):
                bad.append(f"layer {i} {hf_name}")
    if not torch.equal(got["module.decoder.final_layernorm.weight"].float(), hf_sd["model.norm.weight"].float()):
        bad.append("final norm")
    if bad:
        all_ones = all(bool((got[k] == 1).all()) for k in pairs.values())
        hint = " (they are all 1.0: the importer skipped them; apply recipes.cpu_shim)" if all_ones else ""
        raise RuntimeError(f"{nemo_path}: imported norm weights differ from {hf_path}: {', '.join(bad)}{hint}")
    return {"layers": n_layers, "norms_equal": True}


def dist_checkpoint_keys(weights_dir: str | Path) -> list[str]:
    """Names of everything stored in a dist checkpoint's ``weights/`` dir."""
    from torch.distributed.checkpoint import FileSystemReader
    return list(FileSystemReader(str(weights_dir)).read_metadata().state_dict_metadata)


def load_nemo_model(nemo_path: str | Path, family: str = "llama"):
    """(LightningModule, trainer) of a NeMo checkpoint with weights loaded, on CPU, for inference.

    Uses the checkpoint's own ``context/`` (model config + tokenizer) and NeMo's ModelConnector.nemo_load,
    the path ``llm.export_ckpt`` takes; initialises torch.distributed (gloo, world size 1).
    """
    exporter = _model_class(family).exporter("hf", str(nemo_path))
    model, trainer = exporter.nemo_load(Path(nemo_path), cpu=is_cpu())
    model.eval()
    return model, trainer


def nemo_logits(model, input_ids):
    """Logits [batch, seq, padded_vocab] of a NeMo GPT model for right-aligned, unpadded ids."""
    import torch
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    b, s = ids.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s).expand(b, 1, s, s)
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos, attention_mask=mask).float()


DEFAULT_CHECK_PROMPTS = (
    "当月の国内株式市場は上昇しました。",
    "今後の運用につきましては、分散投資を継続する方針です。",
    "The fund outperformed its benchmark by 0.4% in the month.",
)


def import_logits_check(hf_path: str | Path, nemo_path: str | Path, prompts=DEFAULT_CHECK_PROMPTS,
                        family: str = "llama", atol: float = 1e-4) -> dict:
    """Max |logit difference| between the HF model and the imported NeMo checkpoint, fp32, per prompt.

    Raises AssertionError when any prompt differs by more than ``atol``. Needs the CPU shim on a CPU
    (call :func:`prepare_process` first) and initialises torch.distributed in this process.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_path), local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_path), torch_dtype=torch.float32, local_files_only=True).eval()
    model, _ = load_nemo_model(nemo_path, family)
    diffs = []
    for text in prompts:
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = hf(input_ids=ids).logits.float()
        got = nemo_logits(model, ids)[..., : ref.shape[-1]]
        diffs.append(float((got - ref).abs().max()))
    report = {"prompts": len(diffs), "max_abs_diff": max(diffs), "per_prompt": diffs, "atol": atol}
    if max(diffs) > atol:
        raise AssertionError(f"{nemo_path}: NeMo logits differ from {hf_path} by {max(diffs):.3g} > {atol}: {report}")
    return report


# ---------------------------------------------------------------------------------------------
# recipe pieces (each takes only its config node)


def model_config(model: ModelConfig, train: TrainConfig, cpu: bool):
    """run.Config of the NeMo model (LlamaModel/Qwen2Model) mirroring the 2.1 importer's mapping of the
    HF config.json, plus the sequence length and, on CPU, fp32 with every fused kernel off."""
    import nemo_run as run
    import torch
    from nemo.collections import llm

    hf = _check_family(model.hf_path, model.family)

    def divisible_by(vocab: int) -> int:  # as HFLlamaImporter.config does
        base = 128
        while vocab % base:
            base //= 2
        return base

    kw: dict[str, Any] = dict(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        init_method_std=hf.get("initializer_range", 0.02), layernorm_epsilon=hf["rms_norm_eps"],
        rotary_base=hf.get("rope_theta", 10000.0), gated_linear_unit=True, seq_length=train.seq_length,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
    )
    head_dim = hf.get("head_dim")
    if head_dim and head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
        kw["kv_channels"] = head_dim
    if model.family == "llama":
        kw["make_vocab_size_divisible_by"] = divisible_by(hf["vocab_size"])
        rs = hf.get("rope_scaling")
        from nemo.collections.llm.gpt.model.llama import Llama31Config  # not re-exported by llm in 2.1.0
        cls = Llama31Config if rs else llm.LlamaConfig
        if rs:
            kw.update(scale_factor=rs.get("factor", 8.0), low_freq_factor=rs.get("low_freq_factor", 1.0),
                      high_freq_factor=rs.get("high_freq_factor", 4.0),
                      old_context_len=rs.get("original_max_position_embeddings", 8192))
    else:
        kw.update(make_vocab_size_divisible_by=128, vocab_size=hf["vocab_size"])
        cls = llm.Qwen2Config
    if train.activation_checkpointing:  # HF gradient checkpointing = full recompute of every layer
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if cpu:
        kw.update(bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
                  bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
                  cross_entropy_loss_fusion=False, use_cpu_initialization=True,
                  params_dtype=torch.float32, bf16=False, fp16=False)
    model_cls = {"llama": llm.LlamaModel, "qwen2": llm.Qwen2Model}[model.family]
    return run.Config(model_cls, config=run.Config(cls, **kw))


def tokenizer_config(model: ModelConfig):
    """NeMo's AutoTokenizer over the HF dir (its eos/pad are the model's: <|im_end|>, <|endoftext|>)."""
    import nemo_run as run
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
    return run.Config(AutoTokenizer, pretrained_model_name=str(Path(model.hf_path).absolute()), use_fast=True)


def data_config(cfg: ExperimentConfig, output_dir: str | Path, cpu: bool):
    """FineTuningDataModule over the prepared training/validation/test.jsonl. The memmap index files
    go under ``<output_dir>/data_index`` so the prepared dataset dir is never written to."""
    import nemo_run as run
    from nemo.collections import llm

    t = cfg.train
    if t.packed_sequence:
        # nemo 2.1.0 packs with packed_sequence.tokenize_dataset, which ignores dataset_kwargs and uses
        # the default prompt template '{input} {output}': a space after the assistant header.
        raise ValueError("train.packed_sequence=true is not supported with NeMo 2.1.0: its packing step tokenizes "
                         "with the default prompt template '{input} {output}' (ignoring dataset_kwargs), so the "
                         "token ids would differ from the chat-formatted pairs; set train.packed_sequence=false")
    kwargs = dict(SFT_DATASET_KWARGS, index_mapping_dir=str(Path(output_dir).absolute() / "data_index"))
    if cpu:  # default True: get_samples_mapping all-reduces a torch.cuda.LongTensor
        kwargs["sanity_check_dist_workers"] = False
    return run.Config(
        llm.FineTuningDataModule, dataset_root=str(Path(cfg.data.dataset_dir).absolute()), seq_length=t.seq_length,
        tokenizer=tokenizer_config(cfg.model), micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size, seed=t.seed, memmap_workers=1,
        num_workers=0 if cpu else 4, pin_memory=not cpu, persistent_workers=False, dataset_kwargs=kwargs)


def strategy_config(parallel: ParallelConfig, cpu: bool):
    import nemo_run as run
    import torch
    from nemo import lightning as nl

    return run.Config(
        nl.MegatronStrategy, tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size, sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=torch.float32 if cpu else torch.bfloat16,
        # CPU: no async/parallel writer threads and no device-side loading (they assume CUDA).
        ckpt_async_save=not cpu, ckpt_parallel_save=not cpu, ckpt_parallel_load=not cpu,
        ckpt_load_directly_on_device=not cpu, ddp="megatron", gradient_as_bucket_view=True)


def trainer_config(cfg: ExperimentConfig, output_dir: str | Path, cpu: bool):
    import nemo_run as run
    from nemo import lightning as nl

    t = cfg.train
    if cpu and (t.num_devices != 1 or cfg.parallel.num_nodes != 1):
        raise ValueError(f"train.num_devices={t.num_devices}, parallel.num_nodes={cfg.parallel.num_nodes}: a CPU run "
                         "uses one process (set train.num_devices=1 and parallel.num_nodes=1)")
    if cpu and t.precision != "fp32":
        raise ValueError(f"train.precision={t.precision} needs a GPU; use train.precision=fp32 on CPU")
    return run.Config(
        nl.Trainer, accelerator="cpu" if cpu else "gpu", devices=t.num_devices, num_nodes=cfg.parallel.num_nodes,
        max_steps=t.max_steps, log_every_n_steps=t.log_every_n_steps,
        # 0 = validate once, at the end (ExperimentConfig.train.val_check_interval)
        val_check_interval=t.val_check_interval or t.max_steps, limit_val_batches=t.limit_val_batches,
        # count val_check_interval in global steps: a resumed run's epoch holds only the remaining batches
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0, accumulate_grad_batches=1, use_distributed_sampler=False,
        enable_progress_bar=False,
        strategy=strategy_config(cfg.parallel, cpu),
        plugins=run.Config(nl.MegatronMixedPrecision, precision=NEMO_PRECISION[t.precision]),
        callbacks=[run.Config(MetricsCallback, output_dir=str(Path(output_dir).absolute()))])


def optim_config(optim: OptimConfig, train: TrainConfig, parallel: ParallelConfig, cpu: bool):
    """MegatronOptimizerModule: Adam(W) with the config's values and the scheduler of the same shape
    as the HF backend's (cosine to min_lr / linear to 0 / constant, each after linear warmup)."""
    import nemo_run as run
    import torch
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.lightning.pytorch.optim import lr_scheduler as nemo_sched

    if optim.scheduler != "cosine" and optim.min_lr > 0:
        raise ValueError(f"optim.min_lr={optim.min_lr} is only supported with optim.scheduler=cosine")
    bf16, fp16 = train.precision == "bf16-mixed", train.precision == "fp16-mixed"
    opt = run.Config(
        OptimizerConfig, optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=bf16, fp16=fp16,
        params_dtype=torch.bfloat16 if bf16 else (torch.float16 if fp16 else torch.float32),
        use_distributed_optimizer=parallel.use_distributed_optimizer and not cpu)  # needs CUDA collectives
    sched_kw = dict(warmup_steps=optim.warmup_steps, max_steps=train.max_steps)
    if optim.scheduler == "cosine":
        # constant_steps defaults to 80000, which switches CosineAnnealing to Megatron's
        # "warmup, cosine, then hold min_lr" variant that reaches min_lr 80000 steps early.
        sched_kw.update(min_lr=optim.min_lr, constant_steps=0)
    sched = run.Config(getattr(nemo_sched, NEMO_SCHEDULERS[optim.scheduler]), **sched_kw)
    return run.Config(nl.MegatronOptimizerModule, config=opt, lr_scheduler=sched)


def peft_config(method: str, lora: LoraConfig):
    """llm.peft.LoRA for method lora; None (full SFT) otherwise."""
    if method != "lora":
        return None
    import nemo_run as run
    from nemo.collections import llm
    return run.Config(llm.peft.LoRA, dim=lora.dim, alpha=lora.alpha, dropout=lora.dropout,
                      target_modules=list(lora.target_modules))


def log_config(train: TrainConfig, output_dir: str | Path):
    """Checkpoints under ``<output_dir>/nemo/checkpoints``: every ``checkpoint_every_n_steps`` (0: at
    the end only), keeping the newest two and a ``-last`` one that resume picks up."""
    import nemo_run as run
    from nemo import lightning as nl

    every = train.checkpoint_every_n_steps or train.max_steps
    ckpt = run.Config(nl.ModelCheckpoint, every_n_train_steps=every, save_last="link", save_top_k=2,
                      monitor="step", mode="max", save_on_train_epoch_end=True,
                      save_optim_on_train_end=True, filename="{step}")
    return run.Config(nl.NeMoLogger, log_dir=str(Path(output_dir).absolute()), name=CHECKPOINT_SUBDIR,
                      use_datetime_version=False, ckpt=ckpt, tensorboard=None, wandb=None)


def resume_config(restore_path: str | Path):
    """Resume from this run's own last checkpoint when there is one, else start from the import."""
    import nemo_run as run
    from nemo import lightning as nl
    return run.Config(nl.AutoResume, restore_config=run.Config(nl.RestoreConfig, path=str(restore_path)),
                      resume_if_exists=True, resume_ignore_no_checkpoint=True)


def build_recipe(cfg: ExperimentConfig, output_dir: str | Path | None = None, nemo_path: str | Path | None = None,
                 cpu: Optional[bool] = None, with_model: bool = True):
    """``run.Partial(llm.finetune, ...)`` for this experiment (not run). ``nemo_path`` is the imported
    base checkpoint (default: :func:`default_nemo_path` of the HF dir); nothing is read from it here.
    ``with_model=False`` leaves the model out (for :func:`describe` before the model exists)."""
    import nemo_run as run
    from nemo.collections import llm

    cpu = is_cpu() if cpu is None else cpu
    out = Path(output_dir or cfg.output_dir)
    restore = Path(nemo_path) if nemo_path else default_nemo_path(cfg.model.hf_path)
    parts = dict(data=data_config(cfg, out, cpu), trainer=trainer_config(cfg, out, cpu),
                 log=log_config(cfg.train, out), optim=optim_config(cfg.optim, cfg.train, cfg.parallel, cpu),
                 peft=peft_config(cfg.method, cfg.lora), resume=resume_config(restore))
    if with_model:
        parts["model"] = model_config(cfg.model, cfg.train, cpu)
    return run.Partial(llm.finetune, **parts)


def optimizer_settings(cfg: ExperimentConfig, cpu: bool = True) -> dict:
    """The hyperparameters the NeMo recipe resolves to, read back from the built run.Config objects
    (tests/test_nemo_backend.py maps the HF backend's SFTConfig values to the same names and compares
    them field by field)."""
    trainer = trainer_config(cfg, cfg.output_dir, cpu)
    optim = optim_config(cfg.optim, cfg.train, cfg.parallel, cpu)
    data = data_config(cfg, cfg.output_dir, cpu)
    peft = peft_config(cfg.method, cfg.lora)
    o, s = optim.config, optim.lr_scheduler
    sched = {v: k for k, v in NEMO_SCHEDULERS.items()}[s.__fn_or_cls__.__name__]
    dp = cfg.data_parallel_size
    out = dict(
        lr=o.lr, min_lr=getattr(s, "min_lr", 0.0), scheduler=sched, warmup_steps=s.warmup_steps,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, weight_decay=o.weight_decay,
        clip_grad=o.clip_grad, max_steps=trainer.max_steps, micro_batch_size=data.micro_batch_size,
        global_batch_size=data.global_batch_size,
        grad_accumulation_steps=data.global_batch_size // (data.micro_batch_size * dp),
        seq_length=data.seq_length, seed=data.seed,
        precision={v: k for k, v in NEMO_PRECISION.items()}[trainer.plugins.precision],
        bf16=o.bf16, fp16=o.fp16,
        activation_checkpointing=cfg.train.activation_checkpointing,  # -> recompute_granularity in model_config
    )
    if peft is not None:
        out.update(lora_dim=peft.dim, lora_alpha=peft.alpha, lora_dropout=peft.dropout,
                   lora_targets=list(peft.target_modules))
    return out


def describe(cfg: ExperimentConfig, output_dir: str | Path | None = None) -> str:
    """The resolved recipe as text for ``--dry-run``: the LoRA and optimizer values, then the printed
    run.Partial. Needs neither the model nor a GPU; when the HF dir does not exist yet the model
    section is left out and a comment says where it will come from. A config that asks for a GPU
    (bf16/fp16, several devices) is described as its GPU recipe even on a CPU machine."""
    cpu = is_cpu() and cfg.train.precision == "fp32" and cfg.world_size == 1
    out = Path(output_dir or cfg.output_dir)
    note = None
    try:
        recipe = build_recipe(cfg, out, cpu=cpu)
    except FileNotFoundError as e:
        recipe = build_recipe(cfg, out, cpu=cpu, with_model=False)
        note = f"# model: {cfg.model.family} config from {cfg.model.hf_path}/config.json at run time ({e})"
    s = optimizer_settings(cfg, cpu)
    keys = ("lr", "min_lr", "scheduler", "warmup_steps", "adam_beta1", "adam_beta2", "adam_eps", "weight_decay",
            "clip_grad", "max_steps", "micro_batch_size", "global_batch_size", "grad_accumulation_steps",
            "seq_length", "seed", "precision")
    where = "CPU (recipes.cpu_shim applied at run time)" if cpu else "GPU"
    lines = [f"# NeMo 2.1 recipe for {cfg.name} ({cfg.method}) on {where}",
             f"# base checkpoint: {default_nemo_path(cfg.model.hf_path)} (convert.hf_to_nemo of {cfg.model.hf_path})",
             "# optimizer: " + ", ".join(f"{k}={s[k]}" for k in keys),
             (f"# LoRA: dim={s['lora_dim']} alpha={s['lora_alpha']} dropout={s['lora_dropout']} "
              f"target_modules={','.join(s['lora_targets'])}") if cfg.method == "lora" else "# full SFT (no PEFT)"]
    if note:
        lines.append(note)
    lines.append(str(recipe))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# metrics


def micro_batch_counts(tokens, loss_mask) -> dict[str, int]:
    """metrics.jsonl counts for one NeMo SFT micro-batch (after gpt_data_step).

    GPTSFTDataset.collate_fn shifts the sequence: ``tokens = ids[:-1]``, ``loss_mask = mask[1:]``, and
    pads ``tokens`` with the EOS id (so padding cannot be told from a real EOS by value). The loss
    covers the answer and its EOS, the last real token, whose label sits at index ``len(ids) - 2``:
    a row's unpadded length ``len(ids)`` (what the HF backend counts, ``len(tokenize_pair(...).input_ids)``)
    is therefore its last loss position + 2. A row without loss tokens (cannot happen with
    answer_only_loss and add_eos) would count 0.
    """
    import torch
    lm = loss_mask.bool()
    b, s = lm.shape
    pos = torch.arange(s).expand(b, s)
    last = torch.where(lm, pos, torch.full_like(pos, -2)).max(dim=1).values
    return {"tokens": int((last + 2).sum()), "tokens_padded": int(tokens.numel()),
            "loss_tokens": int(lm.sum()), "samples": int(b)}


class MetricsCallback(Callback):
    """Writes ``metrics.jsonl`` (benchmarks.metrics.StepTimer, backend "nemo"): one record per optimizer
    step with the global step after it, reduced_train_loss, the lr the step used and token counts.

    The batch is only visible inside Megatron's forward-backward loop, so the counts come from the
    ``on_megatron_microbatch_start`` hook that MegatronStrategy forwards to trainer callbacks (one
    call per micro-batch; ``step.forward_only`` tells validation apart). On resume the records after
    the restored step are dropped and the file is appended to, so step numbers continue. A
    checkpoint save happens after a step's record is written, so its time lands in the next step's
    ``step_time_s`` (the HF backend saves only at the end).
    """

    def __init__(self, output_dir: str):
        self.output_dir = str(output_dir)
        self.timer = None
        self._lr = None

    def on_train_start(self, trainer, pl_module) -> None:
        from benchmarks.metrics import METRICS_FILE, StepTimer
        path = Path(self.output_dir) / METRICS_FILE
        resumed = trainer.global_step > 0 and path.is_file()
        if resumed:
            keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= trainer.global_step]
            write_text_atomic(path, "".join(line + "\n" for line in keep))
        self.timer = StepTimer(self.output_dir, backend="nemo", append=resumed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.timer.begin()
        self._lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None

    def on_megatron_microbatch_start(self, step, batch, forward_callback) -> None:
        if self.timer is not None and not step.forward_only and batch.get("loss_mask") is not None:
            self.timer.add_batch(**micro_batch_counts(batch["tokens"], batch["loss_mask"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("reduced_train_loss")
        if loss is None and isinstance(outputs, dict):
            loss = outputs.get("loss")
        self.timer.end(trainer.global_step, None if loss is None else float(loss), self._lr)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.timer is not None:
            self.timer.close()


# ---------------------------------------------------------------------------------------------
# running


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_SUBDIR / "checkpoints"


def checkpoint_step(path: str | Path) -> int:
    """The global step in a checkpoint dir name such as ``step=19-last``."""
    import re
    m = re.search(r"step=(\d+)", Path(path).name)
    if not m:
        raise ValueError(f"{path}: no step=N in the checkpoint name")
    return int(m.group(1))


def last_checkpoint(output_dir: str | Path) -> Path:
    """The newest finished checkpoint of a run (highest step; ``-last`` preferred on ties)."""
    d = checkpoint_dir(output_dir)
    ckpts = [p for p in d.glob("*step=*") if p.is_dir() and (p / "weights").is_dir() and (p / "context").is_dir()]
    if not ckpts:
        raise FileNotFoundError(f"{d}: no finished checkpoint")
    return max(ckpts, key=lambda p: (checkpoint_step(p), p.name.endswith("-last")))


def run(cfg: ExperimentConfig, output_dir: str | Path | None = None) -> Path:
    """Fine-tune with NeMo in this process; returns the last checkpoint dir.

    Applies the CPU shim when there is no CUDA, imports the HF model once (cached), builds the recipe,
    writes ``resolved_config.yaml`` and ``nemo_recipe.txt`` into the output dir and runs it.

    Rerunning the same command resumes from the run's last finished checkpoint (weights, optimizer,
    LR scheduler, data position) — after a crash, or with a larger train.max_steps (the restored LR
    scheduler keeps the first run's max_steps; NeMo's schedulers give min_lr beyond it, 0 for the
    linear and constant ones). A finished run rerun
    unchanged trains nothing; use a new output dir for a fresh run.
    """
    import fiddle as fdl

    out = Path(output_dir or cfg.output_dir).absolute()
    cpu = prepare_process()
    nemo_path = import_hf(cfg.model.hf_path, family=cfg.model.family)
    recipe = build_recipe(cfg, out, nemo_path=nemo_path, cpu=cpu)
    write_text_atomic(out / "resolved_config.yaml", cfg.to_yaml())
    write_text_atomic(out / "nemo_recipe.txt", str(recipe) + "\n")
    fdl.build(recipe)()
    return last_checkpoint(out)


# ---------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(
        prog="python -m recipes.nemo_backend",
        description="NeMo 2.1 checkpoint tools (training: python -m recipes.finetune --backend nemo).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--family", choices=["llama", "qwen2"], default="llama")
    common.add_argument("--exclude-patch", action="append", default=[], metavar="NAME",
                        help="leave this recipes.cpu_shim patch out (to demonstrate what it prevents)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", parents=[common], help="HF model dir -> NeMo 2 checkpoint (cached)")
    imp.add_argument("hf_path")
    imp.add_argument("--output", help="checkpoint dir (default: <hf_path>-nemo)")
    imp.add_argument("--importer", choices=IMPORTERS, default="convert",
                     help="convert: the project's streaming converter (convert.hf_to_nemo, default); "
                          "nemo: NeMo 2.1's own llm.import_ckpt")
    imp.add_argument("--no-norm-check", action="store_true",
                     help="keep an import whose norm weights differ from HF (to test the logits check)")
    imp.add_argument("--check-logits", action="store_true", help="then compare logits with the HF model")
    chk = sub.add_parser("check", parents=[common],
                         help="compare an imported checkpoint's logits with its HF model (CPU fp32)")
    chk.add_argument("hf_path")
    chk.add_argument("nemo_path")
    chk.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args(argv)

    try:
        prepare_process(exclude_patches=tuple(args.exclude_patch))
        if args.cmd == "import":
            out = import_hf(args.hf_path, args.output, family=args.family, check_norms=not args.no_norm_check,
                            importer=args.importer)
            report = {"nemo_path": str(out)}
            if args.check_logits:
                report["logits"] = import_logits_check(args.hf_path, out, family=args.family)
        else:
            report = import_logits_check(args.hf_path, args.nemo_path, family=args.family, atol=args.atol)
    except (FileNotFoundError, ValueError, NotImplementedError, AssertionError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":  # the guard matters: NeMo's checkpoint writer re-imports __main__ (spawn)
    raise SystemExit(main())
