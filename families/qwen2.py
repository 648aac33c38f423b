"""Qwen2 (HF ``Qwen2ForCausalLM``): Qwen2.5-72B-Instruct, Athene-V2 — NeMo 2.1 ``Qwen2Model``.

Llama's rows plus q/k/v biases (fused and interleaved like the weights). NeMo's Qwen2Config
carries ``vocab_size`` itself, so Megatron does not pad it (it must divide by TP). transformers'
Qwen2Config has no ``head_dim`` (always hidden / heads) and a ``use_sliding_window`` switch that
NeMo 2.1's Qwen2Model cannot represent. NeMo 2.1.0's own HF importer hard-codes vocab 151936 and
untied embeddings (fixed in 2.2.0): :meth:`Qwen2.nemo_importer` returns a fixed copy.
"""
from __future__ import annotations

from families import register
from families.spec import DECODER_ROWS, QKV_BIAS_ROW, ModelFamily, UnsupportedModelError, bridge_recipes_for

# what NeMo 2.1.0's Qwen2 importer assumes (fixed upstream in 2.2.0)
IMPORTER_VOCAB = 151936


@register
class Qwen2(ModelFamily):
    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    model_type = "qwen2"
    nemo_module = "nemo.collections.llm.gpt.model.qwen2"
    nemo_model = "Qwen2Model"
    nemo_config_class = "Qwen2Config"
    rows = (*DECODER_ROWS[:3], QKV_BIAS_ROW, *DECODER_ROWS[3:])
    vocab_is_preset = True
    known_architectures = (
        # Qwen/Qwen2.5-72B-Instruct config.json (q/k/v bias); Athene-V2-Chat is a fine-tune of it.
        dict(key="qwen25_72b", num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
             ffn_hidden_size=29568, vocab_size=152064, qkv_bias=True, rope_theta=1000000.0,
             max_position_embeddings=32768, rms_norm_eps=1e-6, published_params=72.7e9,
             examples=("Qwen/Qwen2.5-72B-Instruct", "Nexusflow/Athene-V2-Chat")),
    )
    config_prefixes = {"qwen25_72b": "qwen25_72b", "athene_v2": "qwen25_72b"}
    bridge_recipes = {"qwen25_72b": bridge_recipes_for("megatron.bridge.recipes.qwen.qwen2", "qwen25_72b")}

    def make_vocab_size_divisible_by(self, vocab_size):
        return 128  # as NeMo's importer; unused, the config carries vocab_size

    def check_supported(self, hf, path):
        super().check_supported(hf, path)
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{path}: use_sliding_window=true is not supported by NeMo 2.1's Qwen2Model")
        if hf.get("head_dim") and int(hf["head_dim"]) != int(hf["hidden_size"]) // int(hf["num_attention_heads"]):
            raise UnsupportedModelError(f"{path}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")

    def hf_config_fields(self, cfg, *, vocab_size, torch_dtype):
        return {**super().hf_config_fields(cfg, vocab_size=vocab_size, torch_dtype=torch_dtype),
                "use_sliding_window": False}

    def nemo_importer_vocab(self):
        return IMPORTER_VOCAB

    def nemo_importer(self, hf_path):
        """NeMo 2.1.0's HF Qwen2 importer with the two fixes of 2.2.0: it hard-codes vocab_size=151936
        and untied embeddings, so Qwen2.5-72B (vocab 152064) fails on the embedding shape and the small
        tied Qwen2.5 models on the missing output layer. Used directly instead of through
        llm.import_ckpt (which would pick the registered, unfixed importer)."""
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
                    "model.layers.*.input_layernorm.weight":
                        "decoder.layers.*.self_attention.linear_qkv.layer_norm_weight",
                    "model.layers.*.post_attention_layernorm.weight":
                        "decoder.layers.*.mlp.linear_fc1.layer_norm_weight",
                    "model.norm.weight": "decoder.final_layernorm.weight",
                    "lm_head.weight": "output_layer.weight",
                }
                if getattr(source.config, "tie_word_embeddings", False):
                    del mapping["lm_head.weight"]
                return io.apply_transforms(source, target, mapping=mapping,
                                           transforms=[qwen2._import_qkv, qwen2._import_qkv_bias,
                                                       qwen2._import_linear_fc1])

        importer = Qwen2Importer(str(hf_path))
        return lambda output_path: importer(output_path=output_path)
