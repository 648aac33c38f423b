"""The model-family registry (families/) and the third family, Mistral, proven as Llama and Qwen2 are.

Fast: the registry answers by architecture, model_type and NeMo target; the LoRA names (NeMo <-> HF PEFT
<-> NIM) are read off the weight rows; no family name is written into code outside families/ (the rule
that keeps "adding a family" to one file); a family registered twice or claiming another's architecture
is refused; the Mistral shape validates at its real size. Slow (Mistral, tiny random model, CPU): NeMo
and HF LoRA runs from the same config with a falling loss, and the NeMo LoRA exported to HF PEFT
matches NeMo's own LoRA model by logits (convert.verify). The HF -> NeMo -> HF round trip of Mistral
is in tests/test_hf_nemo_convert.py (its VARIANTS).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import families
from families.spec import ModelFamily, UnsupportedModelError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
       "OMP_NUM_THREADS": "1"}
PACKAGES = ("recipes", "convert", "benchmarks", "review_app")


def test_registry_finds_each_family_by_architecture_model_type_and_nemo_target():
    assert families.names() == ["llama", "qwen2", "mistral"]
    for fam in families.all_families():
        assert families.get(fam.name) is fam
        assert families.for_hf({"architectures": [fam.architectures[0]]}) is fam
        assert families.for_hf({"model_type": fam.model_type}) is fam
        assert families.for_nemo({"_target_": fam.nemo_target}) is fam
    with pytest.raises(UnsupportedModelError, match="gemma2.*known: llama, qwen2, mistral"):
        families.get("gemma2")
    with pytest.raises(UnsupportedModelError, match="x/model.yaml.*GemmaModel"):
        families.for_nemo({"_target_": "nemo.collections.llm.GemmaModel"}, "x/model.yaml")


def test_a_family_cannot_be_registered_twice_or_take_another_familys_architecture():
    class Clone(ModelFamily):
        name, architectures, model_type = "clone", ("LlamaForCausalLM",), "clone"

    with pytest.raises(ValueError, match="LlamaForCausalLM.*already belong"):
        families.register(Clone)

    class Other(ModelFamily):
        name, architectures, model_type = "llama", ("OtherForCausalLM",), "other"

    with pytest.raises(ValueError, match="registered twice"):
        families.register(Other)
    assert families.names() == ["llama", "qwen2", "mistral"]


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_lora_names_are_read_off_the_weight_rows(name):
    fam = families.get(name)
    mods = fam.lora_modules()
    assert list(mods) == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    assert mods["linear_qkv"].nemo_path == "self_attention.linear_qkv"
    assert mods["linear_qkv"].hf_paths == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert mods["linear_fc1"].hf_modules == ("gate_proj", "up_proj")
    assert fam.hf_lora_modules(["linear_proj", "linear_fc2"]) == ["o_proj", "down_proj"]
    # each module's row is the weight row of that module: splitting a B matrix is splitting the weight
    for m in mods.values():
        assert m.row.megatron == f"decoder.layers.*.{m.nemo_path}.weight"
    with pytest.raises(UnsupportedModelError, match="linear_xyz"):
        fam.hf_lora_modules(["linear_xyz"])


def test_nim_targets_are_the_families_modules_and_what_nim_documents():
    from convert.nim import NIM_LORA_TARGETS
    # shared/reference/nim-and-serving.md: HF PEFT adapters on q/k/v/o_proj and gate/up/down_proj
    assert set(NIM_LORA_TARGETS) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _string_constants(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_family_name_is_written_into_code_outside_families():
    """Family knowledge lives in families/<name>.py: outside it no code compares with, or tabulates by, a
    family name, HF architecture or NeMo model class (docstrings and comments may name them)."""
    words = set()
    for fam in families.all_families():
        words |= {fam.name, fam.model_type, *fam.architectures, fam.nemo_model, fam.nemo_config_class}
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line, value in _string_constants(path):
                if value in words:
                    found.append(f"{path.relative_to(ROOT)}:{line}: {value!r}")
    assert found == [], "ask the family registry instead:\n" + "\n".join(found)


def test_the_rule_above_would_see_a_family_branch(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(cfg):\n    """Mentions llama in a docstring: fine."""\n    return cfg.family == "qwen2"\n')
    assert [v for _, v in _string_constants(bad)] == ["qwen2"]


def test_mistral_validates_at_its_real_size(tmp_path):
    from recipes.config import load_config
    from recipes.memory import ARCHITECTURES, resolve_architecture
    from recipes.validate import validate

    arch = ARCHITECTURES["mistral_7b"]
    assert arch.family == "mistral" and abs(arch.total_params() - arch.published_params) / arch.published_params < 0.01
    d = tmp_path / "Mistral-7B-Instruct-v0.3"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(arch.to_hf_config()))
    cfg = load_config(ROOT / "nemo_configs/mistral_7b_lora.yaml", [f"model.hf_path={d}"])
    assert resolve_architecture(cfg)[0].key == "mistral_7b"
    assert validate(cfg) == []
    # the same config.json read back: Mistral, untied, 32768-token vocab with no padding at TP 1
    back = families.for_hf(arch.to_hf_config())
    assert back.name == "mistral" and back.padded_vocab(32768, 1) == 32768
    assert back.nemo_config(arch.to_hf_config())[1]["window_size"] is None


def test_a_config_family_must_be_registered(tmp_path):
    from recipes.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="model.family: must be one of .*'gemma2'"):
        load_config(ROOT / "nemo_configs/tiny_lora.yaml", ["model.family=gemma2"])


def test_cpu_recipe_drops_a_sliding_window_that_covers_the_sequence_and_refuses_a_shorter_one(tmp_path):
    from recipes.config import load_config
    from recipes.models import build_tiny
    from recipes.nemo_recipe import model_config

    hf = build_tiny(tmp_path / "m", family="mistral", layers=1)
    cfg_json = json.loads((hf / "config.json").read_text())
    assert cfg_json["model_type"] == "mistral" and cfg_json.get("sliding_window") is None
    cfg_json["sliding_window"] = 256
    (hf / "config.json").write_text(json.dumps(cfg_json))
    cfg = load_config(ROOT / "nemo_configs/tiny_mistral_lora.yaml", [f"model.hf_path={hf}"])
    assert model_config(cfg.model, cfg.train, cpu=True).config.window_size is None  # seq 256 <= window 256
    assert model_config(cfg.model, cfg.train, cpu=False).config.window_size == [256, 0]  # a GPU keeps it
    short = load_config(ROOT / "nemo_configs/tiny_mistral_lora.yaml", [f"model.hf_path={hf}", "train.seq_length=512"])
    with pytest.raises(ValueError, match="sliding window 256 < train.seq_length=512"):
        model_config(short.model, short.train, cpu=True)


# ---------------------------------------------------------------------------------------------
# Mistral on CPU, end to end (slow)


def _run(args, timeout=900):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


@pytest.fixture(scope="module")
def mistral_runs(tmp_path_factory):
    """tiny_mistral_lora.yaml with both backends (6 steps each, same data), then the NeMo LoRA as PEFT."""
    from recipes.data import prepare
    from recipes.models import build_tiny
    base = tmp_path_factory.mktemp("mistral")
    model = build_tiny(base / "tiny-mistral", family="mistral")
    prepare(ROOT / "datasets/demo_pairs.jsonl", base / "data", model, seq_length=256)
    common = ["--config", "nemo_configs/tiny_mistral_lora.yaml", f"model.hf_path={model}",
              f"data.dataset_dir={base / 'data'}", "train.max_steps=6", "optim.warmup_steps=1"]
    out = {"model": model, "base": base}
    for backend in ("nemo", "hf"):
        r = _run(["-m", "recipes.finetune", *common, "--backend", backend, f"output_dir={base / backend}"])
        out[backend] = base / backend
        if backend == "nemo":
            out["ckpt"] = Path(r.stdout.strip().splitlines()[-1].removeprefix("done: "))
    from convert.lora_to_peft import convert
    out["adapter"] = convert(out["ckpt"], base / "peft", base_hf=str(model))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["nemo", "hf"])
def test_mistral_lora_trains_with_a_falling_loss(mistral_runs, backend):
    from benchmarks.metrics import read_metrics
    recs = read_metrics(mistral_runs[backend])
    losses = [r["loss"] for r in recs]
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_mistral_exported_adapter_matches_nemo_lora_logits(mistral_runs):
    cfg = json.loads((Path(mistral_runs["adapter"]) / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"])
    report_path = mistral_runs["base"] / "verify.json"
    _run(["-m", "convert.verify", "--hf", str(mistral_runs["model"]), "--nemo", str(mistral_runs["ckpt"]),
          "--adapter", str(mistral_runs["adapter"]), "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["max_abs_diff"] <= 1e-4 and report["argmax_agree_min"] == 1.0
    assert report["lora_matrices_merged"] == 2 * 4  # 2 layers x 4 targets


@pytest.mark.slow
def test_mistral_hf_loss_is_llamas_on_the_same_weights(mistral_runs):
    """A Mistral without sliding window is a Llama: from the same seed build_tiny gives both the same
    tensors, so the HF backend must give the same loss per step. transformers 4.47.1 alone would train
    Mistral on the mean of micro-batch means and report twice the loss here (2 micro-batches per step);
    recipes.hf_backend.token_mean_loss_over_the_global_batch makes it the per-token mean, as for Llama."""
    from benchmarks.metrics import read_metrics
    from recipes.models import build_tiny
    base = mistral_runs["base"]
    llama = build_tiny(base / "tiny-llama")  # same seed and shape as the fixture's Mistral
    _run(["-m", "recipes.finetune", "--config", "nemo_configs/tiny_lora.yaml", "--backend", "hf",
          f"model.hf_path={llama}", f"data.dataset_dir={base / 'data'}", "train.max_steps=6", "optim.warmup_steps=1",
          f"output_dir={base / 'hf-llama'}"])
    want = [r["loss"] for r in read_metrics(base / "hf-llama")]
    got = [r["loss"] for r in read_metrics(mistral_runs["hf"])]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
