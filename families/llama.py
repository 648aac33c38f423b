"""Llama (HF ``LlamaForCausalLM``): Llama 3 / 3.1, Llama-3.1-Swallow, SmolLM2 — NeMo 2.1 ``LlamaModel``.

The base decoder rows as they are (:data:`families.spec.DECODER_ROWS`); Llama 3.1's ``llama3``
``rope_scaling`` becomes ``Llama31Config`` (scale_factor, low/high_freq_factor, old_context_len).
Vocab: NeMo 2.1's LlamaConfig has no ``vocab_size``; GPTConfig pads the tokenizer length up to
``make_vocab_size_divisible_by``, which HFLlamaImporter sets to the largest power of two <= 128
dividing the HF vocab (so an imported embedding is normally not padded; 128 for 128256).
"""
from __future__ import annotations

from families import register
from families.spec import ModelFamily, UnsupportedModelError, bridge_recipes_for

# Llama 3.1 rope_scaling key -> Llama31Config field, and the HF defaults of those keys.
ROPE_LLAMA3_FIELDS: tuple[tuple[str, str], ...] = (
    ("factor", "scale_factor"), ("low_freq_factor", "low_freq_factor"),
    ("high_freq_factor", "high_freq_factor"), ("original_max_position_embeddings", "old_context_len"))
ROPE_LLAMA3_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
_LLAMA31_ROPE = {"rope_type": "llama3", **ROPE_LLAMA3_DEFAULTS}


@register
class Llama(ModelFamily):
    name = "llama"
    architectures = ("LlamaForCausalLM",)
    model_type = "llama"
    nemo_module = "nemo.collections.llm.gpt.model.llama"
    nemo_model = "LlamaModel"
    nemo_config_class = "LlamaConfig"
    known_architectures = (
        # meta-llama/Llama-3.1-8B(-Instruct) config.json; Llama-3.1-Swallow-8B is continual pre-training of
        # it (same shape, same 128256-token vocabulary).
        dict(key="llama31_8b", num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
             ffn_hidden_size=14336, vocab_size=128256, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
             max_position_embeddings=131072, rms_norm_eps=1e-5, published_params=8.03e9,
             examples=("tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.1", "meta-llama/Llama-3.1-8B-Instruct")),
        dict(key="llama31_70b", num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
             ffn_hidden_size=28672, vocab_size=128256, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
             max_position_embeddings=131072, rms_norm_eps=1e-5, published_params=70.6e9,
             examples=("tokyotech-llm/Llama-3.1-Swallow-70B-Instruct-v0.1", "meta-llama/Llama-3.1-70B-Instruct")),
        # recipes.models presets (CPU): `tiny` defaults and SmolLM2-135M-Instruct.
        dict(key="tiny", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=176, vocab_size=1000, tie_embeddings=True, rope_theta=10000.0,
             max_position_embeddings=2048, examples=("python -m recipes.models tiny",)),
        dict(key="smollm2_135m", num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3,
             ffn_hidden_size=1536, vocab_size=49152, tie_embeddings=True, rope_theta=100000.0,
             max_position_embeddings=8192, published_params=135e6, examples=("HuggingFaceTB/SmolLM2-135M-Instruct",)),
    )
    config_prefixes = {"swallow_8b": "llama31_8b", "llama31_8b": "llama31_8b",
                       "swallow_70b": "llama31_70b", "llama31_70b": "llama31_70b"}
    bridge_recipes = {key: bridge_recipes_for("megatron.bridge.recipes.llama.llama3", key)
                      for key in ("llama31_8b", "llama31_70b")}

    def check_supported(self, hf, path):
        super().check_supported(hf, path)
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise UnsupportedModelError(f"{path}: attention_bias/mlp_bias=true Llama models are not supported "
                                        "(NeMo's LlamaModel has no q/k/v/o or MLP biases)")

    def check_rope_scaling(self, rope_scaling, path):
        if rope_scaling.get("rope_type", rope_scaling.get("type")) != "llama3":
            raise UnsupportedModelError(f"{path}: rope_scaling {rope_scaling} is not supported (only rope_type llama3)")

    def nemo_config(self, hf, path="config.json"):
        cls, kw = super().nemo_config(hf, path)
        rs = hf.get("rope_scaling")
        if rs:
            kw.update({nemo: rs.get(h, ROPE_LLAMA3_DEFAULTS[h]) for h, nemo in ROPE_LLAMA3_FIELDS})
            return "Llama31Config", kw
        return cls, kw

    def hf_config_fields(self, cfg, *, vocab_size, torch_dtype):
        out = super().hf_config_fields(cfg, vocab_size=vocab_size, torch_dtype=torch_dtype)
        out.update(attention_bias=False, mlp_bias=False,
                   head_dim=int(cfg.get("kv_channels") or cfg["hidden_size"] // cfg["num_attention_heads"]))
        if cfg.get("scale_factor") is not None:  # Llama31Config and its subclasses
            out["rope_scaling"] = {"rope_type": "llama3", **{h: cfg[nemo] for h, nemo in ROPE_LLAMA3_FIELDS}}
        return out

    def hf_config_of(self, arch):
        return {**super().hf_config_of(arch), "attention_bias": False, "mlp_bias": False}
