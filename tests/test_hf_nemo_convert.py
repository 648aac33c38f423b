"""Streaming HF <-> NeMo 2 converters (convert.hf_to_nemo, convert.nemo_to_hf) and the family tables (families).

Fast tests (in-process; the first conversion imports NeMo once, ~10 s): the mapping tables cover
transformers' own state dicts, the config tables round-trip, HF -> NeMo -> HF is bit-exact for every
tensor (same names, dtypes, values) with config fields preserved on tiny random models (GQA, odd
vocab, tied/untied, llama3 rope_scaling, bf16, Qwen2 q/k/v biases, sharded input and output), the
NeMo side holds exactly the fused tensors (checked with torch's own DCP reader, not ours), vocab
padding is cut back, and bad input gives errors naming the file and tensor. Slow tests run NeMo in
subprocesses: the conversion loads with NeMo's restore path and gives HF's logits, its tensors equal
NeMo's own importer's, ``llm.finetune`` restores from it, and a ``kill -9`` mid-conversion leaves no
output behind.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest
import torch

import families
from convert import hf_to_nemo, nemo_to_hf
from families.spec import DTYPES, AttentionShape, UnsupportedModelError, dtype_kwargs
from families.layout import merge_qkv
from convert.nemo_ckpt import NemoCheckpoint, read_dist_tensors

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
       "OMP_NUM_THREADS": "1"}
ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}


# ---------------------------------------------------------------------------------------------
# tiny random HF models


@lru_cache(maxsize=None)
def _tokenizer(vocab: int):
    from recipes.models import train_tiny_tokenizer
    return train_tiny_tokenizer(vocab)


def build_hf(out: Path, *, family: str = "llama", vocab: int = 1000, tie: bool = False, rope_scaling=None,
             dtype: str = "float32", layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
             ffn: int = 176, max_shard_size: str | None = None, tok_vocab: int | None = None, seed: int = 0) -> Path:
    """A random HF model of ``family`` with non-trivial norms and biases, saved with save_pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = _tokenizer(tok_vocab or vocab)
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie, torch_dtype=dtype,
              max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    extra = {"llama": {"rope_scaling": rope_scaling}, "mistral": {"sliding_window": None}}.get(family, {})
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(families.get(family).model_type, **kw, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):  # all-ones norms / zero biases would hide a lost mapping
                p.add_(0.1 * torch.randn_like(p))
    model.to(DTYPES[dtype])
    shard = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **shard)
    tok.save_pretrained(out)
    return out


def hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_bit_exact(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def config_diff(a: Path, b: Path, ignore=("transformers_version",)) -> dict:
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    return {k: (ca.get(k), cb.get(k)) for k in set(ca) | set(cb) if k not in ignore and ca.get(k) != cb.get(k)}


# variant -> build_hf kwargs
VARIANTS = {
    "llama-gqa-tied-odd-vocab": dict(family="llama", vocab=997, tie=True),
    "llama-untied-llama3-rope": dict(family="llama", tie=False, rope_scaling=ROPE_LLAMA3),
    "llama-mha-sharded-bf16": dict(family="llama", kv_heads=4, layers=3, max_shard_size="100KB", dtype="bfloat16"),
    "qwen2-tied-bias-bf16": dict(family="qwen2", tie=True, dtype="bfloat16"),
    "qwen2-untied-odd-vocab-sharded": dict(family="qwen2", vocab=997, tie=False, max_shard_size="150KB"),
    "mistral-untied-gqa": dict(family="mistral", tie=False),
    "mistral-tied-odd-vocab-bf16": dict(family="mistral", vocab=997, tie=True, dtype="bfloat16"),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """variant -> (hf dir, nemo dir): every variant built and converted once."""
    base = tmp_path_factory.mktemp("hf_nemo")
    out = {}
    for name, kw in VARIANTS.items():
        hf = build_hf(base / name, **kw)
        nemo = base / f"{name}-nemo"
        hf_to_nemo.convert(hf, nemo, progress=False)
        out[name] = (hf, nemo)
    return out


# ---------------------------------------------------------------------------------------------
# tables


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("tie", [True, False])
def test_mapping_rows_cover_transformers_state_dict_exactly_once(family, tie):
    from transformers import AutoConfig, AutoModelForCausalLM

    fam = families.get(family)
    kw = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=tie)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fam.model_type, **kw))
    names = set(model.state_dict()) - ({"lm_head.weight"} if tie else set())
    produced = [n for row in fam.rows_for(tie) for layer in (range(2) if row.per_layer else [None])
                for n in row.hf_names(layer)]
    assert sorted(produced) == sorted(names)  # each HF tensor made by exactly one row
    assert len({r.dist_key for r in fam.rows}) == len(fam.rows)
    assert families.for_hf(model.config.to_dict()) is fam


def test_unknown_architecture_error_names_config_and_value(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"config\.json.*GPT2LMHeadModel"):
        families.for_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, tmp_path / "config.json")
    hf = build_hf(tmp_path / "m")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["GemmaForCausalLM"]
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        hf_to_nemo.convert(hf, tmp_path / "out", progress=False)
    assert str(hf / "config.json") in str(e.value) and "GemmaForCausalLM" in str(e.value)
    assert not (tmp_path / "out").exists()


HF_CONFIGS = [
    {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096,
     "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
     "rope_theta": 500000.0, "initializer_range": 0.02, "tie_word_embeddings": False, "vocab_size": 128256,
     "max_position_embeddings": 131072, "torch_dtype": "bfloat16", "rope_scaling": {
         "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192}},
    {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 96,
     "intermediate_size": 160, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
     "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "initializer_range": 0.01, "tie_word_embeddings": True,
     "vocab_size": 1001, "max_position_embeddings": 2048, "torch_dtype": "float32"},
    {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 80, "hidden_size": 8192,
     "intermediate_size": 29568, "num_attention_heads": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
     "rope_theta": 1000000.0, "initializer_range": 0.02, "tie_word_embeddings": False, "vocab_size": 152064,
     "max_position_embeddings": 32768, "torch_dtype": "bfloat16", "use_sliding_window": False},
    {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096,
     "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
     "rope_theta": 1000000.0, "initializer_range": 0.02, "tie_word_embeddings": False, "vocab_size": 32768,
     "max_position_embeddings": 32768, "torch_dtype": "bfloat16", "sliding_window": None, "head_dim": 128},
    {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "num_hidden_layers": 2, "hidden_size": 64,
     "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
     "rope_theta": 10000.0, "initializer_range": 0.02, "tie_word_embeddings": True, "vocab_size": 1000,
     "max_position_embeddings": 8192, "torch_dtype": "float32", "sliding_window": 4096, "head_dim": 16},
]


@pytest.mark.parametrize("hf", HF_CONFIGS, ids=["llama31-8b", "llama-headdim-tied", "qwen25-72b", "mistral-7b-v0.3",
                                                "mistral-sliding-window"])
def test_config_tables_round_trip(hf):
    fam = families.for_hf(hf)
    cls, kw = fam.nemo_config(hf)
    want = {"qwen2": "Qwen2Config", "mistral": "MistralConfig7B"}.get(
        hf["model_type"], "Llama31Config" if "rope_scaling" in hf else "LlamaConfig")
    assert cls == want
    assert kw["share_embeddings_and_output_weights"] is hf["tie_word_embeddings"]
    assert kw["num_query_groups"] == hf["num_key_value_heads"]
    if hf.get("head_dim") != hf["hidden_size"] // hf["num_attention_heads"]:
        assert kw.get("kv_channels") == hf.get("head_dim")  # only set when it is not hidden / heads
    else:
        assert "kv_channels" not in kw
    assert not set(kw) & {"params_dtype", "bf16", "fp16"}  # the dtype is the checkpoint's, not the family's
    assert dtype_kwargs(hf)["bf16"] is (hf["torch_dtype"] == "bfloat16")
    if hf["model_type"] == "qwen2":
        assert kw["vocab_size"] == hf["vocab_size"]
    else:  # NeMo's LlamaConfig has no vocab_size: the divisor keeps the embedding unpadded
        assert fam.padded_vocab(hf["vocab_size"]) == hf["vocab_size"]
    back = fam.hf_config_fields(kw, vocab_size=hf["vocab_size"], torch_dtype=hf["torch_dtype"])
    assert {k: back[k] for k in hf if k in back} == {k: hf[k] for k in hf if k in back}
    assert set(hf) - set(back) <= {"head_dim"}  # head_dim only where transformers has it
    if "rope_scaling" in hf:
        assert back["rope_scaling"] == hf["rope_scaling"]


def test_unsupported_config_features_are_refused():
    base = dict(HF_CONFIGS[1])
    for change, word in (({"hidden_act": "gelu"}, "hidden_act"), ({"attention_bias": True}, "attention_bias"),
                         ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
                         ({"torch_dtype": "float64"}, "torch_dtype")):
        with pytest.raises(UnsupportedModelError, match=word):
            families.for_hf(base).nemo_config({**base, **change}, "x/config.json")


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_nemo_side_holds_the_fused_megatron_tensors(converted, variant):
    """Read with torch's own DCP reader (not convert.nemo_ckpt): stacked layers, GQA-interleaved qkv,
    fc1 = [gate; up], norms under the TE names, no lm_head when tied."""
    hf_dir, nemo = converted[variant]
    hf = hf_tensors(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    attn = AttentionShape.from_hf(cfg)
    got = read_dist_tensors(nemo / "weights")
    assert all(k.startswith("module.") for k in got)
    qkv = got["module.decoder.layers.self_attention.linear_qkv.weight"]
    fc1 = got["module.decoder.layers.mlp.linear_fc1.weight"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        assert torch.equal(qkv[i], merge_qkv(*(hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"), **attn.kw))
        assert torch.equal(fc1[i], torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]))
        assert torch.equal(got["module.decoder.layers.self_attention.linear_qkv.layer_norm_weight"][i],
                           hf[p + "input_layernorm.weight"])
    assert torch.equal(got["module.embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"])
    assert ("module.output_layer.weight" in got) is (not cfg["tie_word_embeddings"])
    assert ("module.decoder.layers.self_attention.linear_qkv.bias" in got) is (cfg["model_type"] == "qwen2")
    assert {t.dtype for t in got.values()} == {DTYPES[cfg["torch_dtype"]]}
    assert (nemo / "context" / "nemo_tokenizer" / "tokenizer.json").is_file()
    assert json.loads((nemo / "weights" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_nemo_hf_round_trip_is_bit_exact(converted, variant, tmp_path):
    hf_dir, nemo = converted[variant]
    original = hf_tensors(hf_dir)
    plain = tmp_path / "plain"  # no --base-hf: everything from the NeMo checkpoint
    report = nemo_to_hf.convert(nemo, plain, progress=False)
    assert_bit_exact(original, hf_tensors(plain))
    assert config_diff(hf_dir, plain) == {}
    assert report["vocab_size"] == json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    based = tmp_path / "based"  # --base-hf, small shards: index file, same tensors
    report = nemo_to_hf.convert(nemo, based, base_hf=hf_dir, max_shard_size="120KB", progress=False)
    assert report["shards"] > 1
    index = json.loads((based / nemo_to_hf.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(original)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    for shard in set(index["weight_map"].values()):  # full, or one tensor larger than the limit
        names = [n for n, f in index["weight_map"].items() if f == shard]
        assert len(names) == 1 or sum(original[n].numel() * original[n].element_size() for n in names) <= 120_000
    assert_bit_exact(original, hf_tensors(based))
    assert config_diff(hf_dir, based) == {}
    for d in (plain, based):
        tok = json.loads((d / "tokenizer_config.json").read_text())
        assert tok.get("chat_template") or (d / "chat_template.jinja").is_file()
        assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == _tokenizer(1000).eos_token_id


def test_exported_sharded_model_loads_with_transformers_and_matches(converted, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir, nemo = converted["qwen2-untied-odd-vocab-sharded"]
    out = tmp_path / "out"
    nemo_to_hf.convert(nemo, out, max_shard_size="100KB", progress=False)
    ids = torch.tensor([[1, 5, 17, 300, 42, 996]])
    a = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    b = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_megatron_vocab_padding_is_added_then_cut_back(tmp_path):
    """A Llama whose tokenizer is longer than its embedding: NeMo sizes the embedding from the tokenizer
    (1000 rows); the extra rows are zero, and the export cuts back to config.json's 997."""
    hf_dir = build_hf(tmp_path / "m", vocab=997, tok_vocab=1000)
    report = hf_to_nemo.convert(hf_dir, tmp_path / "nemo", progress=False)
    assert report["embedding_rows"] == 1000
    emb = NemoCheckpoint(tmp_path / "nemo").load_layer("embedding.word_embeddings.weight")
    assert emb.shape == (1000, 64) and not emb[997:].any()
    nemo_to_hf.convert(tmp_path / "nemo", tmp_path / "back", base_hf=hf_dir, progress=False)
    assert_bit_exact(hf_tensors(hf_dir), hf_tensors(tmp_path / "back"))
    assert config_diff(hf_dir, tmp_path / "back") == {}


def test_load_layer_reads_any_chunking(converted):
    """NemoCheckpoint.load_layer (chunk reader) agrees with DCP's full read, per layer and whole."""
    _, nemo = converted["qwen2-untied-odd-vocab-sharded"]
    ckpt = NemoCheckpoint(nemo)
    full = read_dist_tensors(nemo / "weights")
    for name in ckpt.tensors:
        t = full[f"module.{name}"]
        if name.startswith("decoder.layers."):
            for i in range(t.shape[0]):
                assert torch.equal(ckpt.load_layer(name, i), t[i]), (name, i)
        else:
            assert torch.equal(ckpt.load_layer(name), t), name


# ---------------------------------------------------------------------------------------------
# outputs and bad input


def test_existing_output_is_refused_without_overwrite(converted, tmp_path):
    hf_dir, nemo = converted["qwen2-tied-bias-bf16"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        nemo_to_hf.convert(nemo, out, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        hf_to_nemo.convert(hf_dir, out, progress=False)
    assert (out / "keep.txt").is_file()
    nemo_to_hf.convert(nemo, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    with pytest.raises(FileExistsError, match="input"):
        nemo_to_hf.convert(nemo, nemo / "export", progress=False)  # never inside its input


def _rewrite_safetensors(path: Path, drop: str | None = None, reshape: tuple[str, tuple] | None = None) -> None:
    from safetensors.torch import load_file, save_file
    t = load_file(str(path))
    if drop:
        del t[drop]
    if reshape:
        name, shape = reshape
        t[name] = torch.zeros(shape, dtype=t[name].dtype)
    save_file(t, str(path), metadata={"format": "pt"})


def test_bad_hf_input_errors_name_the_file_and_tensor(tmp_path):
    cases = {}
    d = build_hf(tmp_path / "missing")
    _rewrite_safetensors(d / "model.safetensors", drop="model.layers.1.mlp.up_proj.weight")
    cases[d] = ["model.layers.1.mlp.up_proj.weight", "missing"]
    d = build_hf(tmp_path / "shape")
    _rewrite_safetensors(d / "model.safetensors", reshape=("model.layers.0.self_attn.k_proj.weight", (48, 64)))
    cases[d] = ["model.safetensors", "model.layers.0.self_attn.k_proj.weight", "[48, 64]", "[32, 64]"]
    d = build_hf(tmp_path / "truncated")
    f = d / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)
    cases[d] = [str(f), "truncated", "tensor"]
    d = build_hf(tmp_path / "corrupt")
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"not json!!!!"
    f.write_bytes(bytes(raw))
    cases[d] = [str(f), "corrupt"]
    d = build_hf(tmp_path / "shard", max_shard_size="100KB")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    cases[d] = [victim.name, "does not exist"]
    for d, words in cases.items():
        out = tmp_path / f"{d.name}-out"
        with pytest.raises(hf_to_nemo.ConversionError) as e:
            hf_to_nemo.convert(d, out, progress=False)
        for w in words:
            assert w in str(e.value), (d.name, w, str(e.value))
        assert not out.exists()


def test_bad_nemo_input_errors_name_the_checkpoint_and_tensor(converted, tmp_path):
    import shutil
    _, nemo = converted["llama-gqa-tied-odd-vocab"]
    with pytest.raises(nemo_to_hf.ExportError, match="not a NeMo 2 checkpoint"):
        nemo_to_hf.convert(tmp_path, tmp_path / "o1", progress=False)
    # a tensor missing from the dist checkpoint's metadata
    broken = tmp_path / "broken"
    shutil.copytree(nemo, broken)
    md_path = broken / "weights" / ".metadata"
    md = pickle.loads(md_path.read_bytes())
    del md.state_dict_metadata["module.decoder.layers.mlp.linear_fc2.weight"]
    md_path.write_bytes(pickle.dumps(md))
    with pytest.raises(nemo_to_hf.ExportError, match=r"missing tensor 'decoder\.layers\.mlp\.linear_fc2\.weight'"):
        nemo_to_hf.convert(broken, tmp_path / "o2", progress=False)
    # a truncated .distcp file: the chunk reader names the file and the tensor
    cut = tmp_path / "cut"
    shutil.copytree(nemo, cut)
    f = cut / "weights" / "__0_0.distcp"
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"__0_0\.distcp: truncated — module\.decoder"):
        nemo_to_hf.convert(cut, tmp_path / "o3", progress=False)
    # a LoRA adapter checkpoint
    lora = tmp_path / "lora"
    shutil.copytree(nemo, lora)
    (lora / "weights" / "adapter_metadata.json").write_text("{}")
    with pytest.raises(nemo_to_hf.ExportError, match="LoRA adapter"):
        nemo_to_hf.convert(lora, tmp_path / "o4", progress=False)
    # a --base-hf of another shape
    other = build_hf(tmp_path / "other", hidden=32, heads=2, kv_heads=1)
    with pytest.raises(nemo_to_hf.ExportError, match="hidden_size=32"):
        nemo_to_hf.convert(nemo, tmp_path / "o5", base_hf=other, progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_cli_help_and_error_exit_codes(tmp_path):
    for mod in ("convert.hf_to_nemo", "convert.nemo_to_hf"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert r.returncode == 0 and "--output" in r.stdout and "--overwrite" in r.stdout
    r = subprocess.run([sys.executable, "-m", "convert.nemo_to_hf", "--nemo", str(tmp_path), "--output",
                        str(tmp_path / "x")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 1 and "error:" in r.stderr and "weights/.metadata" in r.stderr


def test_parse_size_and_shard_plan():
    assert nemo_to_hf.parse_size("2GB") == 2 * 10**9 and nemo_to_hf.parse_size("1.5MiB") == 1572864
    with pytest.raises(ValueError):
        nemo_to_hf.parse_size("lots")
    ts = [nemo_to_hf.OutTensor(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5])]
    shards = nemo_to_hf.plan_shards(ts, 80)  # 40, 40, 120, 20, 20 bytes
    assert [[t.name for t in s] for s in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert nemo_to_hf.shard_names(3)[1] == "model-00002-of-00003.safetensors"
    assert nemo_to_hf.shard_names(1) == ["model.safetensors"]


# ---------------------------------------------------------------------------------------------
# NeMo itself (slow: subprocesses)


def _run(args, timeout=900):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["llama-untied-llama3-rope", "qwen2-untied-odd-vocab-sharded", "mistral-untied-gqa"])
def test_nemo_restores_the_conversion_with_hf_logits(converted, variant, tmp_path):
    """recipes.nemo_backend check: NeMo's restore path (context + weights) on CPU, fp32, max |Δlogits| <= 1e-4.
    The Llama has llama3 rope_scaling (with original_max_position_embeddings 256 it changes the low
    rotary frequencies), so a lost rope config would show in the logits."""
    hf_dir, nemo = converted[variant]
    report = _run(["-m", "recipes.nemo_backend", "check", str(hf_dir), str(nemo), "--family",
                   families.for_hf(json.loads((hf_dir / "config.json").read_text())).name])
    assert report["max_abs_diff"] <= 1e-4 and report["prompts"] >= 3


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_same_tensors_as_nemos_own_importer(family, tmp_path):
    """llm.import_ckpt (``--importer nemo``; NeMo 2.1's Llama importer cannot dump a llama3-rope config,
    so no rope_scaling here) gives the same keys and bit-identical tensors; ours adds only the TE
    core_attention extra states."""
    from torch.distributed.checkpoint import FileSystemReader

    hf_dir = build_hf(tmp_path / "m", family=family, vocab=997, tie=False, kv_heads=2)
    _run(["-m", "recipes.nemo_backend", "import", str(hf_dir), "--output", str(tmp_path / "ref"), "--family", family,
          "--importer", "nemo"])
    hf_to_nemo.convert(hf_dir, tmp_path / "ours", progress=False)
    ref, ours = read_dist_tensors(tmp_path / "ref" / "weights"), read_dist_tensors(tmp_path / "ours" / "weights")
    assert_bit_exact(ref, ours)
    keys = [set(FileSystemReader(str(tmp_path / d / "weights")).read_metadata().state_dict_metadata)
            for d in ("ref", "ours")]
    assert keys[0] <= keys[1]
    assert all(".core_attention._extra_state/" in k for k in keys[1] - keys[0])
    import yaml
    ym = [yaml.safe_load((tmp_path / d / "context" / "model.yaml").read_text()) for d in ("ref", "ours")]
    same = ("_target_", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
            "layernorm_epsilon", "rotary_base", "share_embeddings_and_output_weights", "make_vocab_size_divisible_by",
            "add_qkv_bias", "params_dtype")
    assert {k: ym[0]["config"].get(k) for k in same} == {k: ym[1]["config"].get(k) for k in same}


_FINETUNE = """
import sys, fiddle as fdl
from pathlib import Path
from recipes import cpu_shim, nemo_recipe as nr
from recipes.config import load_config
from recipes.data import prepare
hf, nemo, out = map(Path, sys.argv[1:4])
cfg = load_config(Path(sys.argv[4]), ["train.max_steps=2", f"model.hf_path={hf}", f"output_dir={out}",
                  f"data.dataset_dir={out / 'data'}", "train.val_check_interval=0", "train.limit_val_batches=1"])
prepare(Path(sys.argv[5]), out / "data", hf, seq_length=cfg.train.seq_length)
cpu = cpu_shim.prepare_process()
fdl.build(nr.build_recipe(cfg, out, nemo_path=nemo, cpu=cpu))()
print('{"checkpoint": "%s"}' % nr.last_checkpoint(out))
"""


@pytest.mark.slow
def test_llm_finetune_restores_from_the_conversion(tmp_path):
    """Two SFT steps of llm.finetune (the backend's recipe) restoring its weights from our checkpoint."""
    hf_dir = build_hf(tmp_path / "m", family="llama", vocab=1000, tie=True)
    hf_to_nemo.convert(hf_dir, tmp_path / "nemo", progress=False)
    report = _run(["-c", _FINETUNE, str(hf_dir), str(tmp_path / "nemo"), str(tmp_path / "run"),
                   str(ROOT / "nemo_configs" / "tiny_sft.yaml"), str(ROOT / "datasets" / "demo_pairs.jsonl")])
    ckpt = Path(report["checkpoint"])
    assert (ckpt / "weights").is_dir()
    before = read_dist_tensors(tmp_path / "nemo" / "weights", ["module.decoder.layers.mlp.linear_fc2.weight"])
    after = read_dist_tensors(ckpt / "weights", ["module.decoder.layers.mlp.linear_fc2.weight"])
    k = "module.decoder.layers.mlp.linear_fc2.weight"
    delta = (after[k] - before[k]).abs().max()
    assert 0 < delta < 0.1  # trained from our weights (a fresh init would differ by ~the weights themselves)


def _wait_for_partial(parent: Path, pattern: str, timeout: float = 120.0) -> Path:
    """The first file matching ``pattern`` under a hidden temp dir in ``parent`` once it holds data."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        for f in parent.glob(pattern):
            if f.stat().st_size > 1_000_000:
                return f
        time.sleep(0.02)
    raise AssertionError(f"no partial output matching {pattern} in {parent}")


@pytest.mark.slow
def test_kill_9_mid_conversion_leaves_no_output(tmp_path):
    """SIGKILL while the weights are being written: the target never exists (only a hidden temp dir)."""
    hf_dir = build_hf(tmp_path / "big", layers=6, hidden=1024, heads=8, kv_heads=2, ffn=4096)  # ~300 MB fp32
    out = tmp_path / "out-nemo"
    p = subprocess.Popen([sys.executable, "-m", "convert.hf_to_nemo", "--hf", str(hf_dir), "--output", str(out)],
                         cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        partial = _wait_for_partial(tmp_path, ".out-nemo.tmp-*/weights/__0_0.distcp")
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(30)
    assert p.returncode == -signal.SIGKILL and partial.exists() and not out.exists()
    # the same for the export, from a complete conversion
    hf_to_nemo.convert(hf_dir, out, progress=False)
    back = tmp_path / "out-hf"
    p = subprocess.Popen([sys.executable, "-m", "convert.nemo_to_hf", "--nemo", str(out), "--output", str(back),
                          "--max-shard-size", "50MB"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        partial = _wait_for_partial(tmp_path, ".out-hf.tmp-*/model-*.safetensors")
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(30)
    assert p.returncode == -signal.SIGKILL and not back.exists()
    assert not any(back.parent.glob("out-hf*/config.json"))
