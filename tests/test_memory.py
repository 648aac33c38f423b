"""Memory estimator (recipes.memory) against published layouts and hand-derived references.

References used (no measured per-GPU memory is published for these layouts, so each reference is
derived by hand from published formulas and published parameter counts, independently of the
estimator's per-module counting):

- parameter counts from the model cards: Llama 3.1 8B 8.03e9, 70B 70.6e9, Qwen2.5-72B 72.7e9;
- weights + grads + optimizer: Megatron's bytes-per-parameter table (distributed optimizer docs;
  ``megatron/training/theoretical_memory_usage.py``): 2 B for a frozen bf16 weight, 18 B per trained
  parameter, ``6 + 12/d`` with the distributed optimizer, on ``params / (TP * PP)`` per GPU;
- activations: Megatron-LM ``theoretical_memory_usage.py`` / Korthikanti et al. 2022 Table 2:
  ``s*b*h*(18 + 4*f/h)`` bytes per layer with sequence parallelism (divided by TP), ``s*b*h*(10 + 24/t)``
  without, ``34*s*b*h`` for TP1, times ``L * (1 + (p-1)/(p*v))`` layers on the first stage of an
  interleaved pipeline; logits ``4*s*b*V`` (fp32) on the last stage.

The layouts are NeMo's published ones: 70B LoRA TP2 PP4 VP20 on 8 GPUs and 70B SFT TP4 PP4 VP5 on 32 GPUs
(Megatron-Bridge performance table, seq 4096, GBS 32, MBS 1), 8B LoRA TP1 on one GPU and 8B SFT TP2
(NeMo 2.1 llama31_8b recipes, seq 2048, GBS 128).
"""
import dataclasses
import json
from types import SimpleNamespace

import pytest

from recipes.memory import (ARCHITECTURES, GIB, Architecture, Layout, compare_with_hf, estimate, live_layers,
                            named_architecture, resolve_architecture)

L8, L70, Q72 = ARCHITECTURES["llama31_8b"], ARCHITECTURES["llama31_70b"], ARCHITECTURES["qwen25_72b"]


def close(got: float, ref: float, tol: float = 0.15) -> bool:
    return abs(got - ref) <= tol * ref


# ---------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("key", ["llama31_8b", "llama31_70b", "qwen25_72b", "smollm2_135m"])
def test_parameter_count_matches_the_model_card(key):
    arch = ARCHITECTURES[key]
    assert abs(arch.total_params() - arch.published_params) / arch.published_params < 0.01, arch.total_params()


def test_shapes_are_the_hf_configs():
    assert (L8.num_layers, L8.hidden_size, L8.num_attention_heads, L8.num_query_groups, L8.ffn_hidden_size,
            L8.vocab_size) == (32, 4096, 32, 8, 14336, 128256)
    assert (L70.num_layers, L70.hidden_size, L70.num_attention_heads, L70.num_query_groups, L70.ffn_hidden_size,
            L70.vocab_size) == (80, 8192, 64, 8, 28672, 128256)
    assert (Q72.num_layers, Q72.hidden_size, Q72.ffn_hidden_size, Q72.vocab_size, Q72.qkv_bias) == (
        80, 8192, 29568, 152064, True)
    assert L8.rope_scaling["rope_type"] == "llama3" and L8.rope_scaling["factor"] == 8.0
    assert Q72.rope_scaling is None and Q72.family == "qwen2"


@pytest.mark.parametrize("key", sorted(ARCHITECTURES))
def test_hf_config_round_trip(key):
    arch = ARCHITECTURES[key]
    back = Architecture.from_hf_config(arch.to_hf_config(), key=key)
    strip = dict(published_params=None, examples=())
    assert dataclasses.replace(back, **strip) == dataclasses.replace(arch, **strip)
    assert compare_with_hf(arch.to_hf_config(), arch) == []


def test_compare_with_hf_names_each_differing_field():
    diffs = compare_with_hf(L8.to_hf_config(), L70)
    text = "; ".join(diffs)
    for field in ("num_hidden_layers: config.json has 32, llama31_70b has 80", "hidden_size", "intermediate_size"):
        assert field in text
    assert not any(d.startswith("vocab_size") for d in diffs)


def test_vocab_padding_follows_nemo():
    # 128256 = 2^8 * 501: NeMo's importer picks divisible_by 128; Megatron pads to 128 * TP
    assert L70.make_vocab_size_divisible_by == 128
    assert [L70.padded_vocab(t) for t in (1, 2, 4, 8)] == [128256, 128256, 128512, 129024]
    # NeMo's Qwen2 config fixes vocab_size: no padding at any TP
    assert {Q72.padded_vocab(t) for t in (1, 2, 8)} == {152064}


def test_lora_parameters_per_layer():
    # NeMo fuses q/k/v and gate/up: one A and one B each. 70B, r16:
    # qkv 16*(8192+10240) + proj 16*(8192+8192) + fc1 16*(8192+57344) + fc2 16*(28672+8192)
    assert L70.lora_layer_params(16) == 16 * (18432 + 16384 + 65536 + 36864)
    assert L70.lora_layer_params(16, ("linear_qkv",)) == 16 * 18432


# ---------------------------------------------------------------------------------------------
# published layouts


def test_70b_lora_tp2_pp4_vp20_on_8_gpus():
    """Reference (first stage, GiB): weights 2 B x 70.6e9 / (TP2 x PP4) = 16.4; activations
    4096*8192*(18 + 4*28672/8192)/2 B/layer x 80 x (1 + 3/80) = 41.5; adapters < 0.5."""
    est = estimate(L70, Layout("lora", tp=2, pp=4, vp=20, sp=True, dp=1, seq_length=4096, num_microbatches=32,
                               lora_dim=16))
    s0 = est.stages[0]
    assert close(s0.weights / GIB, 2 * 70.6e9 / 8 / GIB)
    assert close(s0.activations / GIB, 4096 * 8192 * (18 + 4 * 28672 / 8192) / 2 * 80 * (1 + 3 / 80) / GIB)
    assert (s0.grads + s0.optimizer) / GIB < 0.5
    assert est.peak.stage == 0 and est.fits(80), est.table()


def test_70b_sft_tp4_pp4_vp5_on_32_gpus():
    """Reference (first stage, GiB): weights+grads+optimizer (6 + 12/DP2) B x 70.6e9 / 16 = 49.3;
    activations 4096*8192*32/4 B/layer x 80 x (1 + 3/20) = 23.0. The published runs (NeMo 2.1 llama31_70b
    performance recipe, Megatron-Bridge) reduce grads in bf16 (grad_reduce_in_fp32=False): that layout fits,
    while fp32 grad reduction at seq 4096 does not leave room."""
    fp32_grads = Layout("sft", tp=4, pp=4, vp=5, sp=True, dp=2, seq_length=4096, num_microbatches=16,
                        distributed_optimizer=True)
    est = estimate(L70, fp32_grads)
    s0 = est.stages[0]
    assert close((s0.weights + s0.grads + s0.optimizer) / GIB, (6 + 12 / 2) * 70.6e9 / 16 / GIB)
    assert close(s0.activations / GIB, 4096 * 8192 * 32 / 4 * 80 * (1 + 3 / 20) / GIB)
    published = estimate(L70, dataclasses.replace(fp32_grads, grad_reduce_in_fp32=False))
    assert published.fits(80), published.table()
    assert published.stages[0].grads == pytest.approx(s0.grads / 2)
    assert est.total_gib > published.total_gib


def test_8b_lora_tp1_on_one_gpu():
    """Reference (GiB): weights 2 B x 8.03e9 = 15.0; activations 34*2048*4096 B x 32 layers = 8.5 (Korthikanti,
    TP1, flash attention); logits 4*2048*128256 B = 1.0; tensors ~24.5."""
    est = estimate(L8, Layout("lora", tp=1, dp=1, seq_length=2048, num_microbatches=128, lora_dim=8))
    s = est.stages[0]
    assert close(s.weights / GIB, 2 * 8.03e9 / GIB)
    assert close(s.activations / GIB, 34 * 2048 * 4096 * 32 / GIB)
    assert close(s.tensors / GIB, (2 * 8.03e9 + 34 * 2048 * 4096 * 32 + 4 * 2048 * 128256) / GIB)
    assert est.fits(80)


def test_8b_sft_tp2_on_8_gpus():
    """Reference (GiB): (6 + 12/DP4) B x 8.03e9 / 2 = 33.7; activations without SP
    2048*4096*(10 + 24/2) B x 32 = 5.5 (GPT's formula with dropout masks; Llama has none but SwiGLU is wider)."""
    est = estimate(L8, Layout("sft", tp=2, dp=4, seq_length=2048, num_microbatches=32, distributed_optimizer=True))
    s = est.stages[0]
    assert close((s.weights + s.grads + s.optimizer) / GIB, (6 + 12 / 4) * 8.03e9 / 2 / GIB)
    assert close(s.activations / GIB, 2048 * 4096 * (10 + 24 / 2) * 32 / GIB)
    assert est.fits(80)


@pytest.mark.parametrize("layout", [
    Layout("sft", tp=1, dp=8, seq_length=2048, num_microbatches=4, distributed_optimizer=True),  # 70B SFT, 1 node TP1
    Layout("sft", tp=8, dp=1, seq_length=2048, num_microbatches=32, sp=True, distributed_optimizer=True),  # 1 node TP8
    Layout("lora", tp=1, dp=1, seq_length=2048, num_microbatches=32, lora_dim=16),  # 70B LoRA on one GPU
], ids=["sft-tp1-8gpu", "sft-tp8-1node", "lora-1gpu"])
def test_obviously_wrong_70b_layouts_do_not_fit(layout):
    est = estimate(L70, layout)
    assert not est.fits(80), est.table()
    # 70B SFT on one node: 18 B/param over 8 GPUs alone is ~148 GiB, more than the GPU has
    if layout.method == "sft" and layout.tp == 8:
        assert est.total_gib > 140


# ---------------------------------------------------------------------------------------------
# the pieces of the model


def test_interleaved_pipeline_holds_korthikanti_penalty_on_stage_0():
    lay = Layout("sft", tp=4, pp=4, vp=5, num_microbatches=64)
    assert live_layers(L70, lay, 0) == pytest.approx(80 * (1 + 3 / (4 * 5)))
    assert live_layers(L70, lay, 3) < live_layers(L70, lay, 0)
    # 1F1B without interleaving: p - r micro-batches of L/p layers, fewer when n < p
    one_f1b = Layout("sft", tp=4, pp=4, num_microbatches=64)
    assert [live_layers(L70, one_f1b, r) for r in range(4)] == [80, 60, 40, 20]
    assert live_layers(L70, dataclasses.replace(one_f1b, num_microbatches=2), 0) == 40
    assert live_layers(L70, Layout("sft"), 0) == 80  # no PP: one micro-batch at a time


def test_sequence_parallel_and_recompute_cut_activations():
    base = Layout("sft", tp=8, dp=1, seq_length=2048, num_microbatches=8, distributed_optimizer=True)
    no_sp = estimate(L70, base).stages[0].activations
    sp = estimate(L70, dataclasses.replace(base, sp=True)).stages[0].activations
    rc = estimate(L70, dataclasses.replace(base, sp=True, recompute=True)).stages[0].activations
    # without SP the 8 s*b*h bytes of norm inputs/outputs stay replicated over TP
    per_layer_sbh = 12 + 4 * 8 * 128 / 8192 + 6 * 28672 / 8192
    assert no_sp / sp == pytest.approx((8 + (per_layer_sbh - 8) / 8) / (per_layer_sbh / 8), rel=0.02)
    # full recompute keeps 2*s*b*h/t per layer plus one layer's activations
    sbh = 2048 * 8192
    expected = 80 * 2 * sbh / 8 + per_layer_sbh * sbh / 8 + 2 * 2 * sbh / 8
    assert rc == pytest.approx(expected, rel=0.01)
    assert rc < sp / 5


def test_distributed_optimizer_shards_states_over_dp_and_cp():
    lay = Layout("sft", tp=2, dp=4, seq_length=2048, num_microbatches=8)
    plain = estimate(L8, lay).stages[0].optimizer
    sharded = estimate(L8, dataclasses.replace(lay, distributed_optimizer=True)).stages[0].optimizer
    with_cp = estimate(L8, dataclasses.replace(lay, distributed_optimizer=True, cp=2)).stages[0].optimizer
    assert sharded == pytest.approx(plain / 4) and with_cp == pytest.approx(plain / 8)


def test_lora_trains_only_the_adapters():
    est = estimate(L8, Layout("lora", lora_dim=8, num_microbatches=4))
    s = est.stages[0]
    assert s.trainable == L8.lora_layer_params(8) * 32
    assert s.grads == 4 * s.trainable and s.optimizer == 12 * s.trainable


# ---------------------------------------------------------------------------------------------
# which shape a config has


def _cfg(name, hf_path, preset=None, **model):
    return SimpleNamespace(name=name, model=SimpleNamespace(hf_path=str(hf_path), preset=preset, **model))


def test_architecture_from_the_config_name(tmp_path):
    assert named_architecture(_cfg("swallow_70b_lora", tmp_path))[0] == "llama31_70b"
    assert named_architecture(_cfg("athene_v2_lora", tmp_path))[0] == "qwen25_72b"
    assert named_architecture(_cfg("swallow_8b_sft", tmp_path))[0] == "llama31_8b"
    assert named_architecture(_cfg("tiny_lora", tmp_path, preset="tiny"))[0] == "tiny"
    assert named_architecture(_cfg("my_experiment", tmp_path))[0] is None
    arch, where = resolve_architecture(_cfg("swallow_70b_lora", tmp_path / "missing"))
    assert arch is L70 and "not downloaded yet" in where


def test_a_model_architecture_field_takes_precedence(tmp_path):
    """The proposed ``model.architecture`` config field: the estimator already reads it when present."""
    assert named_architecture(_cfg("my_experiment", tmp_path, architecture="qwen25_72b"))[0] == "qwen25_72b"
    with pytest.raises(KeyError, match="model.architecture='llama4'"):
        named_architecture(_cfg("x", tmp_path, architecture="llama4"))


def test_downloaded_config_json_is_checked_against_the_named_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(L8.to_hf_config()))
    arch, where = resolve_architecture(_cfg("swallow_8b_lora", tmp_path))
    assert arch.num_layers == 32 and where.endswith("config.json")
    with pytest.raises(ValueError, match="does not describe llama31_70b.*num_hidden_layers: config.json has 32"):
        resolve_architecture(_cfg("swallow_70b_lora", tmp_path))
    with pytest.raises(LookupError, match="cannot tell the model shape"):
        resolve_architecture(_cfg("my_experiment", tmp_path / "missing"))


def test_a_built_preset_is_read_as_built(tmp_path):
    """`recipes.models tiny --layers 4` is still the tiny preset: its config.json is the truth, not compared."""
    four = dataclasses.replace(ARCHITECTURES["tiny"], num_layers=4)
    (tmp_path / "config.json").write_text(json.dumps(four.to_hf_config()))
    arch, _ = resolve_architecture(_cfg("tiny_lora", tmp_path, preset="tiny"))
    assert arch.num_layers == 4
    assert resolve_architecture(_cfg("tiny_lora", tmp_path / "unbuilt", preset="tiny"))[0].num_layers == 2
