"""The validator rejects each kind of misfit with the numbers in the message, and passes every shipped config."""
import dataclasses
import json
from pathlib import Path

import pytest

from recipes.config import ConfigError, load_config
from recipes.memory import ARCHITECTURES
from recipes.validate import check, layout_problems, main, shape_problems, validate, warnings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "nemo_configs").glob("*.yaml"))


def cfg_of(name: str, *overrides: str):
    return load_config(ROOT / "nemo_configs" / f"{name}.yaml", list(overrides))


def one_problem(cfg, *needles: str) -> str:
    problems = validate(cfg)
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, f"no problem mentions {needles}: {problems}"
    return hits[0]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_passes(path):
    cfg = load_config(path)
    assert validate(cfg) == []
    check(cfg)  # does not raise


def test_heads_and_groups_must_divide_by_tp():
    cfg = cfg_of("swallow_70b_lora", "parallel.tensor_model_parallel_size=3", "train.num_devices=6",
                 "parallel.sequence_parallel=false")
    one_problem(cfg, "num_attention_heads 64", "tensor_model_parallel_size 3")
    one_problem(cfg, "num_query_groups (KV heads) 8", "tensor_model_parallel_size 3")
    one_problem(cfg, "ffn_hidden_size 28672", "3")
    cfg = cfg_of("swallow_70b_lora", "parallel.tensor_model_parallel_size=16", "parallel.num_nodes=2")
    msg = one_problem(cfg, "num_query_groups (KV heads) 8 is not divisible by tensor_model_parallel_size 16")
    assert not any("num_attention_heads" in p for p in validate(cfg))  # 64 heads do divide by 16
    assert any("TP=16 is larger than the GPUs per node (8)" in w for w in warnings(cfg)), msg


def test_layers_must_divide_by_pp_times_vp():
    cfg = cfg_of("swallow_70b_lora", "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=4",
                 "parallel.virtual_pipeline_model_parallel_size=3")
    one_problem(cfg, "num_layers 80 is not divisible by PP x VP = 12")
    cfg = cfg_of("swallow_8b_lora", "parallel.pipeline_model_parallel_size=8", "train.global_batch_size=8")
    assert validate(cfg) == []  # 32 layers over 8 stages is fine
    cfg = cfg_of("swallow_70b_sft", "parallel.pipeline_model_parallel_size=32", "parallel.tensor_model_parallel_size=1",
                 "parallel.sequence_parallel=false")
    one_problem(cfg, "num_layers 80 is not divisible by pipeline_model_parallel_size 32")


def test_interleaved_schedule_needs_pp_and_a_multiple_of_pp_micro_batches():
    cfg = cfg_of("swallow_70b_lora", "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=4",
                 "parallel.virtual_pipeline_model_parallel_size=5", "train.global_batch_size=30")
    one_problem(cfg, "(VP=5)", "= 30", "multiple of PP=4")
    assert validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=32))) == []
    cfg = cfg_of("swallow_8b_lora", "parallel.virtual_pipeline_model_parallel_size=2")
    one_problem(cfg, "virtual_pipeline_model_parallel_size=2 needs pipeline_model_parallel_size > 1 (got 1)")


def test_global_batch_must_divide_by_micro_batch_times_dp():
    cfg = cfg_of("swallow_8b_lora")
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=30))  # bypasses load checks
    problems = layout_problems(bad)
    assert any("train.global_batch_size=30 is not divisible by micro_batch_size x data-parallel size = 1 x 8 = 8" in p
               for p in problems), problems
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_devices=6),
                              parallel=dataclasses.replace(cfg.parallel, tensor_model_parallel_size=4))
    assert ("world size 6 (train.num_devices=6 x parallel.num_nodes=1) is not divisible by TP x PP x CP = "
            "4 x 1 x 1 = 4") in layout_problems(bad)


def test_vocab_padding_and_fixed_qwen_vocab():
    cfg = cfg_of("swallow_70b_lora")
    assert any("padded to 129024" in w and "cut it back to 128256" in w for w in warnings(cfg))
    # NeMo's Qwen2 config fixes vocab_size (no padding): it must divide by TP
    odd = dataclasses.replace(ARCHITECTURES["qwen25_72b"], vocab_size=152068)
    problems = shape_problems(odd, cfg_of("qwen25_72b_lora"))
    assert problems == ["vocab_size (fixed by NeMo's qwen2 config, not padded) 152068 is not divisible by "
                        "tensor_model_parallel_size 8"]
    assert shape_problems(ARCHITECTURES["qwen25_72b"], cfg_of("qwen25_72b_lora")) == []
    assert any("assumes 151936" in w for w in warnings(cfg_of("athene_v2_lora")))


def test_context_parallel_needs_sequence_divisible_by_2cp():
    cfg = cfg_of("swallow_8b_lora", "parallel.context_parallel_size=2", "train.seq_length=2050")
    one_problem(cfg, "train.seq_length=2050 is not divisible by 2 x context_parallel_size = 4")
    assert validate(cfg_of("swallow_8b_lora", "parallel.context_parallel_size=2")) == []


def test_sequence_parallel_needs_tp():
    one_problem(cfg_of("swallow_8b_lora", "parallel.sequence_parallel=true"),
                "sequence_parallel=true needs tensor_model_parallel_size > 1 (got 1)")
    one_problem(cfg_of("swallow_70b_lora", "train.seq_length=2052"), "seq_length / CP = 2052", "TP=8")


def test_packed_sequences_need_micro_batch_1():
    one_problem(cfg_of("swallow_8b_lora", "train.packed_sequence=true", "train.micro_batch_size=2"),
                "packed_sequence=true needs train.micro_batch_size=1", "got 2")


def test_70b_sft_on_one_node_does_not_fit():
    cfg = cfg_of("swallow_70b_sft", "parallel.num_nodes=1", "parallel.pipeline_model_parallel_size=1")
    msg = one_problem(cfg, "estimated peak", "exceeds 80 GiB")
    assert "weights 16.4" in msg and "optimizer 98.6" in msg  # 70.6e9/8 params x 2 B and x 12 B (DP1: not sharded)
    assert "train.activation_checkpointing=true" in msg  # the hint, with its own (still too large) figure
    with pytest.raises(ConfigError, match="(?s)swallow_70b_sft.*exceeds 80 GiB"):
        check(cfg)


def test_smaller_gpu_rejects_what_fits_80gb():
    cfg = cfg_of("swallow_70b_sft")
    assert validate(cfg, gpu_memory_gb=80) == []
    assert any("exceeds 40 GiB" in p for p in validate(cfg, gpu_memory_gb=40))


def test_hf_dir_of_another_model_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ARCHITECTURES["llama31_8b"].to_hf_config()))
    cfg = cfg_of("swallow_70b_lora", f"model.hf_path={tmp_path}")
    msg = one_problem(cfg, "does not describe llama31_70b")
    assert "num_hidden_layers: config.json has 32, llama31_70b has 80" in msg and "hidden_size" in msg
    # the right model passes
    (tmp_path / "config.json").write_text(json.dumps(ARCHITECTURES["llama31_70b"].to_hf_config()))
    assert validate(cfg) == []


def test_command_prints_the_table_and_sets_the_exit_status(capsys):
    rc = main([str(ROOT / "nemo_configs/swallow_70b_sft.yaml"), str(ROOT / "nemo_configs/swallow_8b_lora.yaml")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "stage layers  weights" in out and "32 GPUs = 4 node(s) x 8" in out and out.count("\nOK") == 2
    rc = main([str(ROOT / "nemo_configs/swallow_70b_sft.yaml"), "--gpu-memory-gb", "40"])
    out = capsys.readouterr().out
    assert rc == 1 and "PROBLEMS" in out and "exceeds 40 GiB" in out
    rc = main([str(ROOT / "nemo_configs/swallow_8b_lora.yaml"), "parallel.sequence_parallel=true"])
    assert rc == 1 and "needs tensor_model_parallel_size > 1" in capsys.readouterr().out
    rc = main([str(ROOT / "nemo_configs/swallow_8b_lora.yaml"), "train.global_batch_size=30"])
    assert rc == 2 and "global_batch_size=30" in capsys.readouterr().err


def test_validation_coverage_of_the_prepared_split_is_noted(tmp_path):
    """Every backend validates the first limit_val_batches whole global batches: a split with rows beyond them,
    or with less than one batch, is a note naming the file and the numbers."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "validation.jsonl").write_text("{}\n" * 70)
    notes = warnings(cfg_of("swallow_8b_lora", f"data.dataset_dir={data}"))  # global batch 32, limit 16
    assert any("validation covers 64 of its 70 rows (2 global batch(es) of 32" in w for w in notes), notes
    (data / "validation.jsonl").write_text("{}\n" * 64)
    assert not any("validation.jsonl" in w for w in warnings(cfg_of("swallow_8b_lora", f"data.dataset_dir={data}")))
    (data / "validation.jsonl").write_text("{}\n" * 5)
    notes = warnings(cfg_of("swallow_8b_lora", f"data.dataset_dir={data}"))
    assert any("5 rows, less than one global batch (32): no backend validates" in w for w in notes), notes
