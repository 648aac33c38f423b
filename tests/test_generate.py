"""Tests of recipes.generate: counts and fields, batched == one-by-one greedy, adapters, stopping."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes import generate as gen
from recipes.prompt import build_messages, render_prompt

DRAFTS = [
    ("当月の国内株式市場は上昇した。", "市場動向"),
    ("＜運用状況＞\n基準価額は前月末比で１．８％上昇。半導体関連株がプラスに寄与し、小売株はマイナスに影響した。", "運用状況"),
    ("今後も分散投資を継続する方針。", "今後の見通しと運用方針"),
    ("米国の長期金利はインフレ指標の鈍化を受けて低下し、為替市場では円高・ドル安が進んだ。欧州株式は小幅安。", "市場動向"),
    ("組入比率は高位を維持。", "運用状況"),
]


def _test_jsonl(path: Path, model_dir: Path, drafts=DRAFTS) -> Path:
    tok = AutoTokenizer.from_pretrained(model_dir)
    with path.open("w", encoding="utf-8") as f:
        for i, (draft, section) in enumerate(drafts):
            prompt = render_prompt(tok, build_messages(draft, section, "2024-03", fund="テストファンド"))
            f.write(json.dumps({"id": f"r{i}", "date": "2024-03", "section": section, "fund": "テストファンド",
                                "input": prompt, "output": f"参照{i}"}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory) -> Path:
    """A tiny model with an untied lm_head. The shared (tied) tiny model greedily repeats its last
    input token ("\n" after the assistant header), which strips to "": useless for comparing outputs."""
    from recipes.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("gen") / "untied", tie_embeddings=False)


@pytest.fixture(scope="module")
def test_file(untied_dir, tmp_path_factory):
    return _test_jsonl(tmp_path_factory.mktemp("gen") / "test.jsonl", untied_dir)


def test_one_prediction_per_record(untied_dir, test_file, tmp_path):
    out = tmp_path / "pred.jsonl"
    rows = gen.generate(untied_dir, test_file, out, max_new_tokens=8, progress=False)
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert written == rows and len(rows) == len(DRAFTS)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(DRAFTS))]  # input order kept
    assert [r["reference"] for r in rows] == [f"参照{i}" for i in range(len(DRAFTS))]
    assert all(set(r) == set(gen.OUTPUT_FIELDS) for r in rows)
    assert any(r["prediction"] for r in rows)
    assert all(r["prediction"] == r["prediction"].strip() for r in rows)
    assert [p.name for p in tmp_path.iterdir()] == ["pred.jsonl"]  # no temp file left


def test_batched_equals_unbatched(untied_dir, test_file, tmp_path):
    tok = AutoTokenizer.from_pretrained(untied_dir)
    lengths = {len(tok(json.loads(line)["input"], add_special_tokens=False)["input_ids"])
               for line in test_file.read_text(encoding="utf-8").splitlines()}
    assert len(lengths) > 1  # the batch really is padded
    one = gen.generate(untied_dir, test_file, tmp_path / "a.jsonl", max_new_tokens=12, batch_size=1,
                       progress=False)
    many = gen.generate(untied_dir, test_file, tmp_path / "b.jsonl", max_new_tokens=12, batch_size=4,
                        progress=False)
    assert [r["prediction"] for r in one] == [r["prediction"] for r in many]
    assert len({r["prediction"] for r in one}) > 1  # different prompts, different continuations


def test_limit_and_txt_output(untied_dir, test_file, tmp_path):
    out = tmp_path / "pred.txt"
    rows = gen.generate(untied_dir, test_file, out, max_new_tokens=4, limit=2, progress=False)
    assert len(rows) == 2
    assert out.read_text(encoding="utf-8").split("\n") == [" ".join(r["prediction"].splitlines()) for r in rows] + [""]
    gen.write_predictions([{"prediction": "一行目\n二行目"}, {"prediction": ""}], out)
    assert out.read_text(encoding="utf-8") == "一行目 二行目\n\n"


def _save_adapter(model_dir: Path, out: Path, b_std: float = 0.0) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    if b_std:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, b_std)
    peft_model.save_pretrained(out)
    return out


def test_zero_adapter_changes_nothing(untied_dir, test_file, tmp_path):
    base = gen.generate(untied_dir, test_file, tmp_path / "base.jsonl", max_new_tokens=12, progress=False)
    zero = _save_adapter(untied_dir, tmp_path / "zero")
    with_zero = gen.generate(untied_dir, test_file, tmp_path / "zero.jsonl", adapter_dir=zero,
                             max_new_tokens=12, progress=False)
    assert [r["prediction"] for r in with_zero] == [r["prediction"] for r in base]
    # Control: the adapter is really applied (a non-zero B changes the output).
    live = _save_adapter(untied_dir, tmp_path / "live", b_std=1.0)
    with_live = gen.generate(untied_dir, test_file, tmp_path / "live.jsonl", adapter_dir=live,
                             max_new_tokens=12, progress=False)
    assert [r["prediction"] for r in with_live] != [r["prediction"] for r in base]


def test_bad_inputs(untied_dir, test_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x", "id": 1}\n{"id": 2, "output": "y"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'input'"):
        gen.read_records(bad)
    with pytest.raises(ValueError, match="is the input file"):
        gen.generate(untied_dir, test_file, test_file, progress=False)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        gen.generate(untied_dir, test_file, tmp_path / "o.jsonl", adapter_dir=tmp_path, progress=False)
    assert gen.main(["--model", str(tmp_path), "--data", str(test_file), "--output", str(tmp_path / "o.jsonl")]) == 2


def test_small_stops_at_eos_and_batches(small_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(small_model_dir)
    data = tmp_path / "test.jsonl"
    questions = ["What is the capital of France? Answer in one word.",
                 "Name one primary colour. Reply with a single word and nothing else, please."]
    with data.open("w", encoding="utf-8") as f:
        for i, q in enumerate(questions):
            prompt = render_prompt(tok, [{"role": "system", "content": "You are a helpful assistant."},
                                         {"role": "user", "content": q}])
            f.write(json.dumps({"id": i, "input": prompt, "output": ""}) + "\n")
    model, tokenizer = gen.load_model(small_model_dir)
    prompts = [json.loads(line)["input"] for line in data.read_text().splitlines()]
    batched = gen.generate_texts(model, tokenizer, prompts, max_new_tokens=24, batch_size=2, progress=False)
    single = gen.generate_texts(model, tokenizer, prompts, max_new_tokens=24, batch_size=1, progress=False)
    assert batched == single
    assert "Paris" in batched[0]
    for text in batched:
        assert text and "<|im_end|>" not in text and "<|im_start|>" not in text
        # it stopped at the end of its turn instead of running to max_new_tokens
        assert len(tok(text)["input_ids"]) < 24
