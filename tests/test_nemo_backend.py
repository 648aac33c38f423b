"""NeMo 2.1 backend on a tiny random Llama, on CPU.

Fast tests check the recipe without running it: hyperparameters equal the HF backend's, the LR
schedules agree, --dry-run names LoRA and optimizer values, NeMo's dataset builds exactly the HF
token ids and the metrics counts match. Slow tests run NeMo in subprocesses (torch.distributed,
megatron parallel state and the CPU shim are process-wide): HF->NeMo import with logits equal to
HF, the skipped-norm importer bug caught, LoRA and SFT runs with falling loss, checkpoint reload,
and a killed run resumed from its checkpoint.
"""
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.metrics import read_metrics
from run_checks import kill_when_step, paused_after
from tracking_checks import assert_mlflow_like_metrics, assert_resumed_mlflow_run, assert_tracked_like_metrics
import families
from convert import nemo_ckpt as nc
from recipes import nemo_import as ni, nemo_metrics as nm, nemo_recipe as nr
from recipes.config import ConfigError, load_config
from recipes.hf_backend import HF_SCHEDULERS, hf_lora_targets, training_arguments

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("nemo_configs/*.yaml"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


# ---------------------------------------------------------------------------------------------
# fixtures: one tiny model + prepared data + NeMo import per module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from recipes.data import prepare
    from recipes.models import build_tiny
    base = tmp_path_factory.mktemp("nemo_tiny")
    model = build_tiny(base / "tiny")
    data = base / "data"
    prepare(ROOT / "datasets/demo_pairs.jsonl", data, model, seq_length=384)
    return {"model": model, "data": data, "base": base}


def _run(args, timeout=600, check=True):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def _last_json(stdout: str) -> dict:
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])


@pytest.fixture(scope="module")
def imported(tiny):
    """`python -m recipes.nemo_backend import <tiny> --check-logits` (HF -> NeMo, then logits vs HF)."""
    r = _run(["-m", "recipes.nemo_backend", "import", str(tiny["model"]), "--check-logits"])
    return _last_json(r.stdout)


def _finetune(config, tiny, out, *overrides, timeout=600, popen=False, env=None):
    args = ["-m", "recipes.finetune", "--config", str(ROOT / f"nemo_configs/{config}.yaml"), "--backend", "nemo",
            f"model.hf_path={tiny['model']}", f"data.dataset_dir={tiny['data']}", f"output_dir={out}", *overrides]
    if popen:  # own session, so the whole process group (incl. any checkpoint writer) can be killed
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env or ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return _run(args, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# hyperparameters: NeMo recipe vs HF backend


def _hf_resolved(cfg) -> dict:
    """The HF backend's SFTConfig values under optimizer_settings()'s names."""
    a = training_arguments(cfg, "/nonexistent", use_cpu=True)
    precision = "bf16-mixed" if a["bf16"] else "fp16-mixed" if a["fp16"] else "fp32"
    return dict(
        lr=a["learning_rate"], min_lr=a["lr_scheduler_kwargs"].get("min_lr", 0.0),
        scheduler={v: k for k, v in HF_SCHEDULERS.items()}[a["lr_scheduler_type"]],
        warmup_steps=a["warmup_steps"], adam_beta1=a["adam_beta1"], adam_beta2=a["adam_beta2"],
        adam_eps=a["adam_epsilon"], weight_decay=a["weight_decay"], clip_grad=a["max_grad_norm"] or 0.0,
        max_steps=a["max_steps"], micro_batch_size=a["per_device_train_batch_size"],
        # every HF process is a data-parallel rank (no tensor parallelism): its accumulation differs from
        # NeMo's when TP/PP > 1, the global batch does not
        global_batch_size=a["per_device_train_batch_size"] * a["gradient_accumulation_steps"] * cfg.world_size,
        seq_length=a["max_seq_length"], seed=a["seed"],
        precision=precision, bf16=a["bf16"], fp16=a["fp16"], activation_checkpointing=a["gradient_checkpointing"])


OVERRIDES = [
    (),
    ("optim.scheduler=linear", "optim.min_lr=0", "optim.warmup_steps=0", "optim.clip_grad=0",
     "train.global_batch_size=16", "train.micro_batch_size=2", "optim.adam_beta2=0.999", "optim.weight_decay=0.01"),
    ("optim.scheduler=constant", "optim.min_lr=0", "optim.warmup_steps=5", "train.seed=7", "train.seq_length=128",
     "train.activation_checkpointing=true", "optim.adam_eps=1e-6"),
    ("train.precision=bf16-mixed", "train.num_devices=4", "parallel.tensor_model_parallel_size=2",
     "train.global_batch_size=16"),
]


@pytest.mark.parametrize("overrides", OVERRIDES, ids=["as-is", "linear", "constant", "bf16-tp2"])
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_backends_get_identical_hyperparameters(config, overrides):
    cfg = load_config(config, list(overrides))
    cpu = cfg.train.precision == "fp32" and cfg.train.num_devices == 1  # as the recipe would run
    nemo = nr.optimizer_settings(cfg, cpu=cpu)
    if cfg.train.global_batch_size % (cfg.train.micro_batch_size * cfg.world_size):
        # every HF process is a data-parallel rank: a global batch smaller than micro-batch x processes
        # (70B full SFT on 32 GPUs with TP8 x PP4) cannot be the HF baseline's, and it says so
        with pytest.raises(ConfigError, match="HF backend runs every process as a data-parallel rank"):
            _hf_resolved(cfg)
        assert cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size > 1
        return
    hf = _hf_resolved(cfg)
    for key, value in hf.items():
        assert nemo[key] == value, f"{config.name} {overrides}: {key}: nemo {nemo[key]!r} != hf {value!r}"
    # and both equal the config itself (neither backend silently substitutes a default)
    o, t = cfg.optim, cfg.train
    assert (nemo["lr"], nemo["warmup_steps"], nemo["max_steps"], nemo["seq_length"]) == (
        o.lr, o.warmup_steps, t.max_steps, t.seq_length)
    if cfg.method == "lora":
        assert (nemo["lora_dim"], nemo["lora_alpha"], nemo["lora_dropout"]) == (
            cfg.lora.dim, cfg.lora.alpha, cfg.lora.dropout)
        # NeMo's module names map onto exactly the HF projections the HF backend adapts
        modules = families.get(cfg.model.family).lora_modules()
        mapped = [m for t_ in nemo["lora_targets"] for m in modules[t_].hf_modules]
        assert mapped == hf_lora_targets(cfg.lora.target_modules, cfg.model.family)
    else:
        assert "lora_dim" not in nemo and nr.peft_config(cfg.method, cfg.lora) is None


def _lr_sequences(cfg):
    import fiddle as fdl
    import torch
    from transformers import get_scheduler

    a = training_arguments(cfg, "/nonexistent", use_cpu=True)
    p = torch.nn.Parameter(torch.zeros(1))
    nemo_opt, hf_opt = torch.optim.SGD([p], lr=cfg.optim.lr), torch.optim.SGD([p], lr=cfg.optim.lr)
    sched_cfg = nr.optim_config(cfg.optim, cfg.train, cfg.parallel, cpu=True).lr_scheduler
    nemo_sched = fdl.build(sched_cfg).scheduler(None, nemo_opt)["lr_scheduler"]["scheduler"]
    hf_sched = get_scheduler(a["lr_scheduler_type"], hf_opt, num_warmup_steps=a["warmup_steps"],
                             num_training_steps=a["max_steps"], scheduler_specific_kwargs=a["lr_scheduler_kwargs"])
    nemo_lrs, hf_lrs = [], []
    for _ in range(cfg.train.max_steps):
        nemo_lrs.append(nemo_opt.param_groups[0]["lr"])
        hf_lrs.append(hf_opt.param_groups[0]["lr"])
        nemo_opt.step(), hf_opt.step()
        nemo_sched.step(), hf_sched.step()
    return nemo_lrs, hf_lrs


@pytest.mark.parametrize("overrides", [(), ("optim.scheduler=linear", "optim.min_lr=0"),
                                       ("optim.scheduler=constant", "optim.min_lr=0", "optim.warmup_steps=4")],
                         ids=["cosine", "linear", "constant"])
def test_lr_schedules_agree_after_warmup(overrides):
    """The LR of every step: identical to HF once warmup is over. During warmup the libraries differ
    (documented in recipes/nemo_recipe.py): NeMo lr*(s+1)/(w+1), HF lr*s/w."""
    cfg = load_config(ROOT / "nemo_configs/tiny_lora.yaml", list(overrides))
    w, lr = cfg.optim.warmup_steps, cfg.optim.lr
    nemo, hf = _lr_sequences(cfg)
    assert w > 0
    for s in range(w):
        assert nemo[s] == pytest.approx(lr * (s + 1) / (w + 1)) and hf[s] == pytest.approx(lr * s / w)
    assert nemo[w:] == pytest.approx(hf[w:], rel=1e-9, abs=1e-12)
    assert nemo[w] == pytest.approx(lr)
    if cfg.optim.scheduler == "cosine":  # decays towards min_lr, not below it and not to 0 early
        assert cfg.optim.min_lr < nemo[-1] < nemo[w]


# ---------------------------------------------------------------------------------------------
# recipe and dry run


def test_cpu_recipe_uses_cpu_settings():
    cfg = load_config(ROOT / "nemo_configs/tiny_lora.yaml")
    r = nr.build_recipe(cfg, "/tmp/out", cpu=True, with_model=False)
    s, d, o = r.trainer.strategy, r.data, r.optim.config
    assert r.trainer.accelerator == "cpu" and r.trainer.plugins.precision == "32"
    assert (s.ckpt_async_save, s.ckpt_parallel_save, s.ckpt_load_directly_on_device) == (False, False, False)
    assert (d.num_workers, d.pin_memory, d.dataset_kwargs["sanity_check_dist_workers"]) == (0, False, False)
    assert d.dataset_kwargs["prompt_template"] == "{input}{output}"  # no space after the assistant header
    assert o.use_distributed_optimizer is False and o.bf16 is False
    gpu = nr.build_recipe(cfg.replace(**{"train.precision": "bf16-mixed"}), "/tmp/out", cpu=False, with_model=False)
    assert gpu.trainer.accelerator == "gpu" and gpu.trainer.plugins.precision == "bf16-mixed"
    assert gpu.optim.config.use_distributed_optimizer is True and gpu.optim.config.bf16 is True
    no_dist = cfg.replace(**{"train.precision": "bf16-mixed", "parallel.use_distributed_optimizer": "false"})
    no_dist_recipe = nr.build_recipe(no_dist, "/tmp/o", cpu=False, with_model=False)
    assert no_dist_recipe.optim.config.use_distributed_optimizer is False
    assert gpu.trainer.strategy.ckpt_async_save is True and gpu.data.pin_memory is True
    assert "sanity_check_dist_workers" not in gpu.data.dataset_kwargs


def test_model_config_mirrors_hf_config_and_turns_fusions_off_on_cpu(tiny):
    cfg = load_config(ROOT / "nemo_configs/tiny_lora.yaml", [f"model.hf_path={tiny['model']}"])
    m = nr.model_config(cfg.model, cfg.train, cpu=True).config
    hf = json.loads((tiny["model"] / "config.json").read_text())
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == (
        hf["num_hidden_layers"], hf["hidden_size"], hf["intermediate_size"], hf["num_attention_heads"],
        hf["num_key_value_heads"])
    assert m.share_embeddings_and_output_weights == hf["tie_word_embeddings"]
    assert m.seq_length == cfg.train.seq_length and m.layernorm_epsilon == hf["rms_norm_eps"]
    assert not any([m.apply_rope_fusion, m.masked_softmax_fusion, m.bias_activation_fusion,
                    m.gradient_accumulation_fusion, m.bf16])


def test_gpu_model_config_turns_off_only_the_kernels_this_host_lacks(tiny, capsys):
    """A CUDA host without Transformer Engine / Apex (the offline bundle's target): megatron-core 0.10 would
    stop on apply_rope_fusion, persist_layer_norm, masked_softmax_fusion, gradient_accumulation_fusion."""
    from recipes.nemo_kernels import missing_gpu_kernels
    everything = {"transformer_engine", "apex", "scaled_upper_triang_masked_softmax_cuda",
                  "fused_weight_gradient_mlp_cuda"}
    assert missing_gpu_kernels(have=everything.__contains__, fused_rope=lambda: True) == {}  # nemo:24.12
    assert set(missing_gpu_kernels(have=lambda m: m == "transformer_engine", fused_rope=lambda: True)) == {
        "gradient_accumulation_fusion"}  # TE without Apex: TE's spec needs neither norm nor softmax kernels
    bare = missing_gpu_kernels()  # this CPU venv has neither TE nor Apex
    assert set(bare) == {"apply_rope_fusion", "persist_layer_norm", "masked_softmax_fusion",
                         "gradient_accumulation_fusion"}
    cfg = load_config(ROOT / "nemo_configs/tiny_lora.yaml", [f"model.hf_path={tiny['model']}"])
    m = nr.model_config(cfg.model, cfg.train, cpu=False).config
    fields = {f.name for f in dataclasses.fields(m.__fn_or_cls__)}  # m: a run.Config of NeMo's config class
    assert set(bare) <= fields  # the names are NeMo's: a rename upstream fails here
    assert not any(getattr(m, k) for k in bare)
    assert m.bias_activation_fusion and m.bias_dropout_fusion  # torch.jit kernels stay on
    out = capsys.readouterr().out
    assert all(f"nemo: {k}=False on this host" in out for k in bare)


def test_bad_settings_give_errors_naming_the_key_or_file(tmp_path):
    cfg = load_config(ROOT / "nemo_configs/tiny_lora.yaml")
    with pytest.raises(ValueError, match="train.precision"):
        nr.trainer_config(cfg.replace(**{"train.precision": "bf16-mixed"}), "/tmp/o", cpu=True)
    with pytest.raises(ValueError, match="parallel.num_nodes=2: a CPU run uses processes on this machine"):
        nr.trainer_config(cfg.replace(**{"parallel.num_nodes": "2"}), "/tmp/o", cpu=True)
    with pytest.raises(ValueError, match="train.packed_sequence"):
        nr.data_config(cfg.replace(**{"train.packed_sequence": "true", "train.micro_batch_size": "1"}), "/tmp/o",
                       cpu=False)
    with pytest.raises(FileNotFoundError, match="config.json"):
        nr.model_config(cfg.model.__class__(hf_path=str(tmp_path / "missing")), cfg.train, cpu=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match="is the qwen2 family, not model.family='llama'"):
        ni.import_hf(tmp_path, family="llama")


@pytest.mark.parametrize("config", ["tiny_lora", "tiny_sft"])
def test_dry_run_names_lora_and_optimizer_without_model(config, capsys, tmp_path):
    from recipes.finetune import main
    cfg = load_config(ROOT / f"nemo_configs/{config}.yaml")
    rc = main(["--config", str(ROOT / f"nemo_configs/{config}.yaml"), "--backend", "nemo", "--dry-run",
               f"model.hf_path={tmp_path / 'not-built-yet'}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert not (tmp_path / "not-built-yet").exists()
    o = cfg.optim
    for text in (f"lr={o.lr}", f"min_lr={o.min_lr}", f"warmup_steps={o.warmup_steps}", f"adam_beta2={o.adam_beta2}",
                 f"clip_grad={o.clip_grad}", f"max_steps={cfg.train.max_steps}", "CosineAnnealingScheduler",
                 f"global_batch_size={cfg.train.global_batch_size}", "Partial[finetune("):
        assert text in out, text
    if config == "tiny_lora":
        assert f"# LoRA: dim={cfg.lora.dim} alpha={cfg.lora.alpha}" in out
        assert "target_modules=" + ",".join(cfg.lora.target_modules) in out
        assert "LoRA(" in out
    else:
        assert "full SFT" in out and "LoRA(" not in out


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_dry_run_works_for_every_config_on_this_machine(config, capsys, tmp_path):
    from recipes.finetune import main
    cfg = load_config(config)
    rc = main(["--config", str(config), "--backend", "nemo", "--dry-run", f"model.hf_path={tmp_path / 'absent'}"])
    out = capsys.readouterr().out
    assert rc == 0 and f"lr={cfg.optim.lr}" in out
    gpu = cfg.train.precision != "fp32" or cfg.world_size > 1
    assert ("accelerator='gpu'" in out) == gpu and ("accelerator='cpu'" in out) == (not gpu)


def test_dry_run_shows_model_config_when_model_exists(tiny, capsys):
    from recipes.finetune import main
    rc = main(["--config", str(ROOT / "nemo_configs/tiny_lora.yaml"), "--backend", "nemo", "--dry-run",
               f"model.hf_path={tiny['model']}"])
    out = capsys.readouterr().out
    assert rc == 0 and "LlamaConfig(" in out and "num_layers=2" in out and "apply_rope_fusion=False" in out


# ---------------------------------------------------------------------------------------------
# tokens and metrics


def test_nemo_dataset_builds_the_hf_token_ids_and_metrics_counts(tiny, tmp_path):
    """GPTSFTDataset with the recipe's dataset_kwargs gives, for every training record, exactly the ids
    of recipes.tokens.tokenize_pair (what the HF backend trains on), truncation included; and the
    metrics counts derived from a collated NeMo batch equal the HF backend's counts."""
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
    from nemo.collections.llm.gpt.data.core import create_sft_dataset
    from transformers import AutoTokenizer as HFTokenizer

    from recipes.tokens import tokenize_pair

    records = [json.loads(ln) for ln in (tiny["data"] / "training.jsonl").read_text().splitlines()]
    hf_tok = HFTokenizer.from_pretrained(tiny["model"])
    nemo_tok = AutoTokenizer(str(tiny["model"]), use_fast=True)
    truncated = 0
    for seq in (384, 128):
        ds = create_sft_dataset(tiny["data"] / "training.jsonl", tokenizer=nemo_tok, seq_length=seq,
                                memmap_workers=1, index_mapping_dir=str(tmp_path), sanity_check_dist_workers=False,
                                **nr.SFT_DATASET_KWARGS)
        pairs = [tokenize_pair(hf_tok, r["input"], r["output"], seq) for r in records]
        truncated += sum(p.truncated for p in pairs)
        for i, p in enumerate(pairs):
            assert ds[i]["input_ids"] == p.input_ids, f"record {i} (seq {seq}): NeMo and HF token ids differ"
        for start in (0, 8, 16):
            batch = ds.collate_fn([ds[i] for i in range(start, start + 4)])
            counts = nm.micro_batch_counts(batch["tokens"], batch["loss_mask"])
            group = pairs[start:start + 4]
            assert counts["tokens"] == sum(len(p.input_ids) for p in group) == sum(batch["token_count"])
            assert counts["loss_tokens"] == sum(p.completion_tokens for p in group)
            assert counts["samples"] == 4 and counts["tokens_padded"] == batch["tokens"].numel()
    assert truncated > 0  # the truncation path was exercised


def test_micro_batch_counts_on_a_handmade_batch():
    import torch
    # two rows: ids of length 5 (prompt 3, answer 1 + eos) and 3 (prompt 1, answer 1 + eos), shifted
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    tokens = torch.zeros_like(loss_mask)
    assert nm.micro_batch_counts(tokens, loss_mask) == {"tokens": 8, "tokens_padded": 12, "loss_tokens": 4,
                                                        "samples": 2}


def test_metrics_callback_drops_records_after_the_restored_step(tmp_path):
    from types import SimpleNamespace
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)))
    cb = nm.MetricsCallback(str(tmp_path))
    cb.on_train_start(SimpleNamespace(global_step=4, loggers=[]), None)
    cb.timer.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    cb = nm.MetricsCallback(str(tmp_path))  # a fresh run (step 0) starts the file again
    cb.on_train_start(SimpleNamespace(global_step=0, loggers=[]), None)
    cb.timer.close()
    assert read_metrics(path) == []


# ---------------------------------------------------------------------------------------------
# import (slow: subprocesses)


def test_default_nemo_path_and_incomplete_imports(tmp_path):
    assert ni.default_nemo_path(tmp_path / "m") == tmp_path / "m-nemo"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m-nemo" / "weights").mkdir(parents=True)
    assert not ni.import_is_complete(tmp_path / "m", tmp_path / "m-nemo")  # no context/, no marker


def test_ranks_other_than_zero_wait_for_rank_zeros_import(tiny_model_dir, tmp_path, monkeypatch):
    """torchrun's ranks all call import_hf: rank 1 writes nothing and returns once rank 0's import has landed (not
    N imports at once, each replacing the last while another rank may be reading it)."""
    import functools
    import shutil
    import threading
    from recipes import fileio
    hf = shutil.copytree(tiny_model_dir, tmp_path / "m")
    dest = ni.default_nemo_path(hf)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(ni, "made_by_rank_zero", functools.partial(fileio.made_by_rank_zero, timeout_s=0.5,
                                                                     poll_s=0.05))
    with pytest.raises(TimeoutError, match=f"{dest}.*not made by rank 0 within 0.5 s"):
        ni.import_hf(hf)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # rank 1 wrote nothing
    fam, config = ni.family_of(hf)
    rank0 = threading.Timer(0.2, ni._import, args=(hf, dest, fam, config, "convert", True))
    monkeypatch.setattr(ni, "made_by_rank_zero", functools.partial(fileio.made_by_rank_zero, timeout_s=120,
                                                                     poll_s=0.05))
    rank0.start()
    try:
        assert ni.import_hf(hf) == dest  # waited for it
    finally:
        rank0.join()
    assert ni.import_is_complete(hf, dest)


def test_made_by_rank_zero_makes_once_and_waits_elsewhere(capsys):
    from recipes.fileio import made_by_rank_zero
    made = []
    done = lambda: bool(made)  # noqa: E731
    made_by_rank_zero(lambda: made.append(1), done, "x", rank=0)
    made_by_rank_zero(lambda: None, lambda: False, "y", rank=0, timeout_s=0.1)  # rank 0 never waits
    made_by_rank_zero(lambda: made.append(2), done, "x", rank=3)  # done already: rank 3 neither makes nor waits
    assert made == [1]
    with pytest.raises(TimeoutError, match=r"^thing: not made by rank 0 within 0.1 s \(rank 2 waited for it; "):
        made_by_rank_zero(lambda: made.append(3), lambda: False, "thing", rank=2, timeout_s=0.1, poll_s=0.02)
    assert made == [1]
    assert capsys.readouterr().err == "rank 2: waiting for rank 0 to make thing\n"  # said once


@pytest.mark.slow
def test_import_keeps_norms_and_logits_match_hf(tiny, imported):
    import torch
    from safetensors.torch import load_file

    assert imported["logits"]["max_abs_diff"] <= 1e-4 and imported["logits"]["prompts"] >= 3
    nemo_path = Path(imported["nemo_path"])
    assert nemo_path == ni.default_nemo_path(tiny["model"]) and ni.import_is_complete(tiny["model"], nemo_path)
    hf = load_file(str(tiny["model"] / "model.safetensors"))
    # build_tiny randomises the norms, so a skipped mapping (all 1.0) cannot pass by accident
    assert not torch.equal(hf["model.layers.0.input_layernorm.weight"], torch.ones(64))
    # dist-checkpoint names are TE-style even for the local spec (megatron maps them), stacked by layer
    pre_attn = "module.decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    pre_mlp = "module.decoder.layers.mlp.linear_fc1.layer_norm_weight"
    got = nc.read_dist_tensors(nemo_path / "weights", [pre_attn, pre_mlp])
    for i in range(2):
        assert torch.equal(got[pre_attn][i], hf[f"model.layers.{i}.input_layernorm.weight"])
        assert torch.equal(got[pre_mlp][i], hf[f"model.layers.{i}.post_attention_layernorm.weight"])


@pytest.mark.slow
def test_import_is_cached(tiny, imported):
    t = time.perf_counter()
    r = _run(["-m", "recipes.nemo_backend", "import", str(tiny["model"])])
    assert _last_json(r.stdout)["nemo_path"] == imported["nemo_path"]
    assert "Converted Llama model" not in r.stdout + r.stderr, "a complete import was redone"
    assert time.perf_counter() - t < 60


@pytest.mark.slow
def test_skipped_norm_importer_bug_is_caught(tiny, tmp_path):
    """Without the shim's converter patch the 2.1.0 importer leaves every RMSNorm at 1.0: the import's
    norm check refuses it, and an import kept anyway fails the logits check."""
    bad = tmp_path / "bad-nemo"
    patch = ["--importer", "nemo", "--exclude-patch", "converters_map_local_norm_names"]
    r = _run(["-m", "recipes.nemo_backend", "import", str(tiny["model"]), "--output", str(bad), *patch], check=False)
    assert r.returncode == 1 and "they are all 1.0" in r.stderr, r.stderr[-3000:]
    assert not bad.exists()  # nothing half-written is left behind
    r = _run(["-m", "recipes.nemo_backend", "import", str(tiny["model"]), "--output", str(bad), *patch,
              "--no-norm-check", "--check-logits"], check=False)
    assert r.returncode == 1 and "NeMo logits differ" in r.stderr, r.stderr[-3000:]
    assert not ni.import_is_complete(tiny["model"], bad, "nemo")  # an unchecked import is never reused


@pytest.mark.slow
def test_qwen2_import_with_tied_embeddings_and_own_vocab(tiny):
    """NeMo 2.1.0's Qwen2 importer hard-codes vocab 151936 and untied embeddings; the backend's fixed
    importer must give HF's logits for a tied Qwen2 with a 1000-token vocab."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = tiny["base"] / "qwen2"
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, torch_dtype="float32"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):  # non-trivial norms and qkv biases
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    report = _last_json(_run(["-m", "recipes.nemo_backend", "import", str(out), "--family", "qwen2",
                              "--check-logits"]).stdout)
    assert report["logits"]["max_abs_diff"] <= 1e-4
    weights = Path(report["nemo_path"]) / "weights"
    emb = nc.read_dist_tensors(weights, ["module.embedding.word_embeddings.weight"])
    assert emb["module.embedding.word_embeddings.weight"].shape == (len(tok), 64)
    assert not any(k.startswith("module.output_layer") for k in nc.dist_checkpoint_keys(weights))  # tied


# ---------------------------------------------------------------------------------------------
# training runs (slow: subprocesses through python -m recipes.finetune)


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["tiny_lora", "tiny_sft"])
def test_nemo_run_loss_falls_writes_metrics_and_checkpoint(config, tiny, imported, tmp_path, mlflow_uri):
    """Also tracked in MLflow: tiny_lora on the test's MLflow server (when it can run), tiny_sft in a file:
    store; the same checks as the HF runs (tests/test_hf_backend.py), so both backends log the same names."""
    out = tmp_path / config
    steps = 12
    store = mlflow_uri if config == "tiny_lora" else f"file:{tmp_path / 'mlruns'}"
    r = _finetune(config, tiny, out, f"train.max_steps={steps}", *([f"tracking.mlflow={store}"] if store else []))
    ckpt = Path(r.stdout.strip().splitlines()[-1].removeprefix("done: "))
    recs = read_metrics(out)
    assert [x["step"] for x in recs] == list(range(1, steps + 1))
    for x in recs:
        assert x["backend"] == "nemo" and x["step_time_s"] > 0 and math.isfinite(x["loss"])
        assert x["samples"] == 8
        assert 0 < x["loss_tokens"] < x["tokens"] <= x["tokens_padded"]
        assert x["lr"] > 0
    losses = [x["loss"] for x in recs]
    first, last = _mean(losses[:3]), _mean(losses[-3:])
    assert last < first - (0.1 if config == "tiny_lora" else 0.5), (first, last)
    assert (out / "resolved_config.yaml").is_file() and (out / "nemo_recipe.txt").is_file()
    tags = assert_tracked_like_metrics(out, recs)
    assert "reduced_train_loss" in tags  # NeMo's own metrics, by NeMo's logger, in the same files
    assert all(x["grad_norm"] > 0 for x in recs)
    if store:
        client, run = assert_mlflow_like_metrics(out, recs, "nemo", config)
        assert client.get_metric_history(run.info.run_id, "reduced_train_loss")  # NeMo's own, by its logger
    assert not (ROOT / "lightning_logs").exists() and not (out / "lightning_logs").exists()
    assert ckpt == nr.last_checkpoint(out) and (ckpt / "weights").is_dir() and (ckpt / "context").is_dir()
    keys = nc.dist_checkpoint_keys(ckpt / "weights")
    model_keys = [k for k in keys if k.startswith("module.")]
    if config == "tiny_lora":  # adapters only, pointing at the imported base
        assert model_keys and all(".adapter." in k for k in model_keys)
        meta = json.loads((ckpt / "weights" / "adapter_metadata.json").read_text())
        assert meta["model_ckpt_path"] == imported["nemo_path"]
    else:  # full weights, changed by training; reloaded by NeMo and run (logits no longer HF's)
        assert "module.embedding.word_embeddings.weight" in model_keys
        report = _last_json(_run(["-m", "recipes.nemo_backend", "check", str(tiny["model"]), str(ckpt),
                                  "--atol", "1e9"]).stdout)
        assert math.isfinite(report["max_abs_diff"]) and report["max_abs_diff"] > 1e-3


@pytest.mark.slow
def test_both_backends_validate_the_same_rows_to_the_same_loss(tiny, imported, tmp_path):
    """Validation after every step, limit_val_batches=3 global batches of 2 rows on validation.jsonl's 5 rows:
    both evaluate the first two global batches (the third would be incomplete), 4 micro-batches of one row. With
    lr 1e-9 both models stay the base model (LoRA B starts at zero), so the ``eval/loss`` of both - the mean over
    the micro-batches of their per-token mean - agree at each step (HF on all five rows: 6.871 against 6.884,
    seen). NeMo's own val_loss weights its two batches 1:2 (README), so it is not the one compared."""
    from benchmarks.metrics import read_tensorboard
    assert len((tiny["data"] / "validation.jsonl").read_text().splitlines()) == 5
    same = ["train.max_steps=2", "train.val_check_interval=1", "train.limit_val_batches=3", "train.micro_batch_size=1",
            "train.global_batch_size=2", "optim.lr=1e-9", "optim.min_lr=0", "optim.warmup_steps=0"]
    _finetune("tiny_lora", tiny, tmp_path / "nemo", *same)
    _run(["-m", "recipes.finetune", "--config", str(ROOT / "nemo_configs/tiny_lora.yaml"), "--backend", "hf",
          f"model.hf_path={tiny['model']}", f"data.dataset_dir={tiny['data']}", f"output_dir={tmp_path / 'hf'}", *same])
    nemo, hf = read_tensorboard(tmp_path / "nemo" / "tb")["eval/loss"], read_tensorboard(tmp_path / "hf" / "tb")["eval/loss"]
    assert [s for s, _ in nemo] == [s for s, _ in hf] == [1, 2], (nemo, hf)
    for (_, a), (_, b) in zip(nemo, hf):
        assert a == pytest.approx(b, abs=2e-5), (nemo, hf)
    assert 5 < hf[0][1] < 8  # a random model's loss, about ln(vocab)


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(tiny, imported, tmp_path):
    """LoRA, 8 steps, a checkpoint every 4. The run is killed once step 6 is logged; rerunning the
    same command resumes from the step-4 checkpoint (weights, optimizer, scheduler, data position):
    metrics keep steps 1-4 as written and continue with 5-8, and every step has the data and the
    loss of an uninterrupted run of the same command (nothing skipped, nothing replayed). MLflow: the rerun
    ends the killed run (left RUNNING) as KILLED and starts one tagged with it."""
    overrides = ["train.max_steps=8", "train.checkpoint_every_n_steps=4"]
    _finetune("tiny_lora", tiny, tmp_path / "reference", *overrides)
    reference = read_metrics(tmp_path / "reference")

    out = tmp_path / "resume"
    overrides.append(f"tracking.mlflow=file:{tmp_path / 'mlruns'}")
    proc = _finetune("tiny_lora", tiny, out, *overrides, popen=True, env=paused_after(6, ENV))
    metrics = out / "metrics.jsonl"
    killed = kill_when_step(proc, metrics, 6)  # SIGKILL of the child's process group
    assert [r["step"] for r in killed][:6] == [1, 2, 3, 4, 5, 6], "the first run was not killed mid-way"
    assert len(killed) < 8, "the first run finished before it was killed"
    assert nr.checkpoint_step(nr.last_checkpoint(out)) == 3  # NeMo names it by the 0-based step index
    killed_run = json.loads((out / "mlflow_run.json").read_text())["run_id"]

    _finetune("tiny_lora", tiny, out, *overrides)
    resumed = read_metrics(metrics)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert resumed[:4] == killed[:4]  # kept as written by the first run, not recomputed
    assert [r["time_s"] for r in resumed[4:6]] != [r["time_s"] for r in killed[4:6]]  # 5-6 were rerun
    for got, ref in zip(resumed, reference):
        assert (got["tokens"], got["loss_tokens"], got["lr"]) == (ref["tokens"], ref["loss_tokens"], ref["lr"]), \
            f"step {ref['step']}: different data or lr than the uninterrupted run"
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5), f"step {ref['step']}"
    assert_resumed_mlflow_run(out, killed_run, resumed[4:], "nemo", "tiny_lora")
