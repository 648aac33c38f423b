"""Mistral (HF ``MistralForCausalLM``): Mistral-7B v0.3 and its fine-tunes — NeMo 2.1 ``MistralModel``.

The smallest family file, and the one to copy for a new family: Llama's rows and vocab rule as
they are; what differs is the NeMo classes (``MistralConfig7B``) and sliding-window attention. HF
``sliding_window`` (None since v0.3) becomes Megatron's ``window_size = [sliding_window, 0]``, as
NeMo's HFMistralImporter does; megatron-core 0.10 implements it only in Transformer Engine's
attention (the local spec asserts ``window_size is None``), so a CPU run drops it when the sequence
fits in the window (identical attention) and refuses it otherwise (``recipes.nemo.recipe``).
NeMo 2.1.0's own importer sets ``seq_length = sliding_window`` (None for v0.3, which then fails)
and always unties the embeddings; ``convert.hf_to_nemo`` uses max_position_embeddings and the
config's tying.
"""
from __future__ import annotations

from families import register
from families.spec import ModelFamily, UnsupportedModelError


@register
class Mistral(ModelFamily):
    name = "mistral"
    architectures = ("MistralForCausalLM",)
    model_type = "mistral"
    nemo_module = "nemo.collections.llm.gpt.model.mistral"
    nemo_model = "MistralModel"
    nemo_config_class = "MistralConfig7B"
    known_architectures = (
        # mistralai/Mistral-7B-Instruct-v0.3 config.json (vocab 32768, no sliding window).
        dict(key="mistral_7b", num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
             ffn_hidden_size=14336, vocab_size=32768, rope_theta=1000000.0, max_position_embeddings=32768,
             rms_norm_eps=1e-5, published_params=7.25e9, examples=("mistralai/Mistral-7B-Instruct-v0.3",)),
    )
    config_prefixes = {"mistral_7b": "mistral_7b"}
    # transformers' MistralConfig defaults to sliding_window=4096; v0.3 and the tiny test model have none
    tiny_hf_overrides = {"sliding_window": None}

    def check_supported(self, hf, path):
        super().check_supported(hf, path)
        sw = hf.get("sliding_window")
        if sw is not None and (not isinstance(sw, int) or sw <= 0):
            raise UnsupportedModelError(f"{path}: sliding_window {sw!r} must be a positive integer or null")

    def nemo_config(self, hf, path="config.json"):
        cls, kw = super().nemo_config(hf, path)
        sw = hf.get("sliding_window")
        kw["window_size"] = None if sw is None else [int(sw), 0]  # MistralConfig7B defaults to [4096, 0]
        return cls, kw

    def hf_config_fields(self, cfg, *, vocab_size, torch_dtype):
        out = super().hf_config_fields(cfg, vocab_size=vocab_size, torch_dtype=torch_dtype)
        ws = cfg.get("window_size")
        out.update(sliding_window=int(ws[0]) if ws else None,
                   head_dim=int(cfg.get("kv_channels") or cfg["hidden_size"] // cfg["num_attention_heads"]))
        return out

    def hf_config_of(self, arch):
        return {**super().hf_config_of(arch), "sliding_window": None}
