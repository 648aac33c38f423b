"""Tests of recipes.models: the tiny preset (shapes, determinism, tokenizer, template, atomic writes)
and the small preset (SmolLM2 GGUF -> HF: reload, generation, logits equal to the GGUF model)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from recipes import models
from recipes.config import ModelConfig
from recipes.prompt import SYSTEM_PROMPT, build_messages, render_prompt

FINAL = "当月の国内株式市場は上昇しました。"


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# tiny


def test_tiny_builds_in_seconds_and_reloads_exactly(tmp_path):
    t0 = time.perf_counter()
    out = models.build_tiny(tmp_path / "tiny")
    assert time.perf_counter() - t0 < 15
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    saved = _weights(out)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    state = model.state_dict()
    # Every saved tensor is what the model holds, and nothing was left to random init on load.
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    missing = set(state) - set(saved)
    assert missing <= {"lm_head.weight"}
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_tiny_is_deterministic_per_seed(tmp_path):
    a = models.build_tiny(tmp_path / "a", seed=3)
    b = models.build_tiny(tmp_path / "b", seed=3)
    c = models.build_tiny(tmp_path / "c", seed=4)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_tiny_gqa_shapes_and_random_norms(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (64, 4, 2)
    assert cfg["rope_theta"] == 10000.0
    w = _weights(tiny_model_dir)
    head_dim = 64 // 4
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        assert w[p + "self_attn.q_proj.weight"].shape == (4 * head_dim, 64)
        assert w[p + "self_attn.k_proj.weight"].shape == (2 * head_dim, 64)
        assert w[p + "self_attn.v_proj.weight"].shape == (2 * head_dim, 64)
        assert w[p + "mlp.gate_proj.weight"].shape == (176, 64)
        assert w[p + "mlp.down_proj.weight"].shape == (64, 176)
    norms = [k for k in w if k.endswith("norm.weight")]
    assert len(norms) == 2 * cfg["num_hidden_layers"] + 1
    for k in norms:
        assert not torch.allclose(w[k], torch.ones_like(w[k])), f"{k} is all ones"
        assert (w[k] - 1).abs().max() < 1.0  # near one, so activations stay sane
    assert w["model.embed_tokens.weight"].shape[0] == len(AutoTokenizer.from_pretrained(tiny_model_dir))


def test_tiny_odd_sizes_untied(tmp_path):
    out = models.build_tiny(tmp_path / "odd", layers=3, hidden=48, heads=3, kv_heads=1, ffn=100, vocab=777,
                            tie_embeddings=False, max_position_embeddings=512)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(tok) == 777 == model.config.vocab_size
    assert model.config.num_key_value_heads == 1 and model.config.head_dim == 16
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 48)
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert "lm_head.weight" in _weights(out)
    ids = tok("当月の市場", return_tensors="pt")
    assert model(**ids).logits.shape == (1, ids["input_ids"].shape[1], 777)


def test_tiny_embedding_rows_beyond_the_tokenizer(tmp_path):
    """--embedding-rows pads the embedding / LM head past the tokenizer (the smoke test's 128,256 rows)."""
    out = models.build_tiny(tmp_path / "wide", vocab=777, embedding_rows=1024, tie_embeddings=False)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(tok) == 777 and model.config.vocab_size == 1024
    assert model.lm_head.weight.shape == (1024, 64) and model.model.embed_tokens.weight.shape == (1024, 64)
    ids = tok("当月の市場", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == 1024
    info = json.loads((out / models.BUILD_INFO).read_text())
    assert (info["vocab"], info["embedding_rows"]) == (777, 1024)


@pytest.mark.parametrize("kwargs, match", [
    ({"vocab": 777, "embedding_rows": 700}, "every token needs a row"),
    ({"hidden": 50, "heads": 4}, "not divisible by heads"),
    ({"heads": 4, "kv_heads": 3}, "kv_heads"),
    ({"hidden": 36, "heads": 4}, "even"),
    ({"vocab": 100}, "at least"),
    ({"layers": 0}, "layers"),
])
def test_tiny_rejects_bad_sizes(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.build_tiny(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_tiny_special_tokens_and_ids(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|endoftext|>")
    assert tok.pad_token_id == 0 and tok.pad_token_id != tok.eos_token_id
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    gen = GenerationConfig.from_pretrained(tiny_model_dir)
    for c in (cfg, gen.to_dict()):
        assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (
            tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    # Encoding adds nothing: the chat template carries all special tokens.
    assert tok("下書き")["input_ids"] == tok("下書き", add_special_tokens=False)["input_ids"]
    assert "token_type_ids" not in tok("x")


def test_tiny_tokenizer_round_trips_and_is_compact(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in ["＜市場環境＞\nTOPIXは２，５０１．７１ﾎﾟｲﾝﾄ（前月末比-2.1%）", "US equities  rose.\n\n", FINAL]:
        assert tok.decode(tok(text)["input_ids"]) == text
    # Trained on the prompt: far fewer tokens than UTF-8 bytes (3 per kana/kanji).
    assert len(tok(SYSTEM_PROMPT)["input_ids"]) < len(SYSTEM_PROMPT.encode()) / 6
    assert tok.convert_ids_to_tokens(tok("2024")["input_ids"]) == ["2", "0", "2", "4"]  # digits split


def test_chat_template_renders_chatml(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = build_messages("下書きです。", "市場動向", "2024-01", fund="Aファンド", final=FINAL)
    full = tok.apply_chat_template(msgs, tokenize=False)
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    assert full == expected
    prompt = render_prompt(tok, msgs)
    assert prompt == expected[: expected.index("<|im_start|>assistant")] + "<|im_start|>assistant\n"
    # {% generation %} marks exactly the assistant content and its eos.
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert marked == tok(FINAL)["input_ids"] + [tok.eos_token_id]


def test_overwrite_is_refused_then_atomic(tmp_path):
    out = models.build_tiny(tmp_path / "m", seed=1)
    before = _weights(out)["model.embed_tokens.weight"]
    with pytest.raises(FileExistsError, match="already exists"):
        models.build_tiny(out, seed=2)
    assert torch.equal(_weights(out)["model.embed_tokens.weight"], before)
    models.build_tiny(out, seed=2, overwrite=True)
    assert not torch.equal(_weights(out)["model.embed_tokens.weight"], before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or old dirs left behind


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr("transformers.PreTrainedTokenizerFast.save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        models.build_tiny(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_ensure_model(tmp_path):
    path = tmp_path / "auto"
    cfg = ModelConfig(hf_path=str(path), preset="tiny")
    assert models.ensure_model(cfg) == path
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert models.ensure_model(cfg) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    with pytest.raises(FileNotFoundError, match="preset"):
        models.ensure_model(ModelConfig(hf_path=str(tmp_path / "missing")))


def test_cli_tiny(tmp_path, capsys):
    out = tmp_path / "cli"
    assert models.main(["tiny", "--output", str(out), "--no-tie", "--vocab", "600", "--layers", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vocab"] == 600 and info["tie_embeddings"] is False and info["layers"] == 1
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert models.main(["tiny", "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# small (SmolLM2-135M-Instruct from GGUF)


def test_small_special_tokens(small_model_dir):
    tok = AutoTokenizer.from_pretrained(small_model_dir, local_files_only=True)
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>" and tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    cfg = json.loads((small_model_dir / "config.json").read_text())
    gen = GenerationConfig.from_pretrained(small_model_dir)
    assert cfg["eos_token_id"] == gen.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert cfg["pad_token_id"] == gen.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert cfg["bos_token_id"] == tok.convert_tokens_to_ids("<|im_start|>")
    assert "quantization_config" not in cfg
    assert type(tok).__name__ == "PreTrainedTokenizerFast"  # what NeMo's AutoTokenizer can load


def test_small_generates_for_a_chat_prompt(small_model_dir):
    tok = AutoTokenizer.from_pretrained(small_model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(small_model_dir, local_files_only=True)
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok(render_prompt(tok, msgs), add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:]
    text = tok.decode(new, skip_special_tokens=True).strip()
    assert text
    assert tok.eos_token_id in new.tolist()  # an instruct model ends its turn with <|im_end|>


def test_small_matches_the_gguf_model(small_model_dir):
    gguf = models.smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    saved = AutoModelForCausalLM.from_pretrained(small_model_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(small_model_dir, local_files_only=True)
    texts = ["Hello world, 2024 was 12.5% up!", "当月の国内株式市場は、TOPIXが2,501.71ポイントとなりました。",
             "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    for text in texts:  # same ids as the GGUF tokenizer, without its spurious BOS
        assert tok(text)["input_ids"] == ref_tok(text, add_special_tokens=False)["input_ids"]
    ids = tok(texts[1], return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(ref(**ids).logits, saved(**ids).logits)
    info = json.loads((small_model_dir / models.BUILD_INFO).read_text())
    assert info["logit_check"]["max_abs_logit_diff"] == 0.0 and info["seconds"]["gguf_load"] > 0
