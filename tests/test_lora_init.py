"""recipes.lora_init (lora.a_init_seed): the same LoRA starting adapter in every backend. Here on the HF side and
on plain modules; the NeMo and bridge runs that start from it are compared in tests/test_bridge.py."""
from __future__ import annotations

import pytest
import torch

import families
from recipes.config import ConfigError, load_config
from recipes.lora_init import apply_seeded_lora_a, apply_seeded_lora_a_hf, canonical_name, seeded_a


def test_seeded_a_is_deterministic_per_name_and_seed_with_xavier_bounds():
    a = seeded_a("decoder.layers.0.self_attention.linear_qkv.adapter.linear_in.weight", (8, 64), 7)
    assert torch.equal(a, seeded_a("decoder.layers.0.self_attention.linear_qkv.adapter.linear_in.weight", (8, 64), 7))
    assert not torch.equal(a, seeded_a("decoder.layers.1.self_attention.linear_qkv.adapter.linear_in.weight", (8, 64), 7))
    assert not torch.equal(a, seeded_a("decoder.layers.0.self_attention.linear_qkv.adapter.linear_in.weight", (8, 64), 8))
    bound = (6 / (8 + 64)) ** 0.5
    assert a.dtype == torch.float32 and a.abs().max() <= bound and a.abs().max() > 0.9 * bound


def test_canonical_names_drop_the_frameworks_wrappers():
    want = "decoder.layers.3.mlp.linear_fc1.adapter.linear_in.weight"
    assert canonical_name("module.module." + want) == canonical_name(want) == want
    assert canonical_name("module.decoder.layers.3.mlp.linear_fc1.adapter.linear_out.weight") is None


class _Adapter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear_in = torch.nn.Linear(16, 4, bias=False)


def test_megatron_style_modules_get_the_seeded_a_and_sharded_or_empty_models_are_refused():
    m = torch.nn.Module()
    m.decoder = torch.nn.Module()
    m.decoder.layers = torch.nn.ModuleList([torch.nn.Module()])
    m.decoder.layers[0].adapter = _Adapter()
    assert apply_seeded_lora_a([m], seed=3) == 1
    assert torch.equal(m.decoder.layers[0].adapter.linear_in.weight,
                       seeded_a("decoder.layers.0.adapter.linear_in.weight", (4, 16), 3))
    with pytest.raises(ValueError, match="tensor_model_parallel_size=1"):
        apply_seeded_lora_a(m, seed=3, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="no LoRA A"):
        apply_seeded_lora_a(torch.nn.Linear(2, 2), seed=3)


def test_hf_peft_model_starts_from_the_fused_modules_a(tiny_model_dir):
    """q/k/v_proj get linear_qkv's A, gate/up_proj linear_fc1's, o_proj linear_proj's, down_proj linear_fc2's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    fam = families.get("llama")
    targets = fam.hf_lora_modules(["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    n = apply_seeded_lora_a_hf(peft, 11, fam)
    layers = peft.base_model.model.model.layers
    assert n == 7 * len(layers)
    attn, mlp = layers[1].self_attn, layers[1].mlp
    qkv = seeded_a("decoder.layers.1.self_attention.linear_qkv.adapter.linear_in.weight", (8, 64), 11)
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert torch.equal(proj.lora_A["default"].weight, qkv)
    fc1 = seeded_a("decoder.layers.1.mlp.linear_fc1.adapter.linear_in.weight", (8, 64), 11)
    assert torch.equal(mlp.gate_proj.lora_A["default"].weight, fc1) and torch.equal(mlp.up_proj.lora_A["default"].weight, fc1)
    down = mlp.down_proj.lora_A["default"].weight
    assert torch.equal(down, seeded_a("decoder.layers.1.mlp.linear_fc2.adapter.linear_in.weight", tuple(down.shape), 11))


def test_a_init_seed_is_validated(tmp_path):
    cfg = load_config("nemo_configs/tiny_lora.yaml", ["lora.a_init_seed=5"])
    assert cfg.lora.a_init_seed == 5 and load_config("nemo_configs/tiny_lora.yaml").lora.a_init_seed is None
    with pytest.raises(ConfigError, match="a_init_seed"):
        load_config("nemo_configs/tiny_lora.yaml", ["lora.a_init_seed=-1"])
