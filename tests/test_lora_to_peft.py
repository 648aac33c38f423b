"""NeMo 2 LoRA -> HF PEFT on a real NeMo run (odd GQA shape): the exported adapter loaded with peft gives
the NeMo LoRA model's logits (convert.verify) and the merged model's; a wrong split is caught."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convert.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_key, read_adapter, write_adapter
from convert.lora_to_peft import convert, main as lora_to_peft_main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
SHAPE = dict(layers=2, hidden=48, heads=6, kv_heads=2, ffn=100, tie_embeddings=False)  # head_dim 8, 3 heads/group


def _run(args, check=True):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} -> rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r


@pytest.fixture(scope="module")
def nemo_lora(tmp_path_factory):
    from recipes.data import prepare
    from recipes.models import build_tiny
    base = tmp_path_factory.mktemp("lora2peft")
    model = build_tiny(base / "tiny", **SHAPE)
    prepare(ROOT / "datasets/demo_pairs.jsonl", base / "data", model, seq_length=256)
    out = base / "run"
    r = _run(["-m", "recipes.finetune", "--config", "nemo_configs/tiny_lora.yaml", "--backend", "nemo",
              f"model.hf_path={model}", f"data.dataset_dir={base / 'data'}", f"output_dir={out}",
              "train.max_steps=3", "optim.warmup_steps=1"])
    ckpt = Path(r.stdout.strip().splitlines()[-1].removeprefix("done: "))
    adapter = convert(ckpt, base / "peft", base_hf=str(model))
    return {"model": model, "ckpt": ckpt, "adapter": adapter, "base": base}


@pytest.mark.slow
def test_adapter_layout(nemo_lora):
    cfg, tensors = read_adapter(nemo_lora["adapter"])
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    d = 48 // 6
    for layer in range(2):
        a = tensors[lora_key(layer, "self_attn.q_proj", "A")]
        assert a.shape == (8, 48)
        assert torch.equal(a, tensors[lora_key(layer, "self_attn.k_proj", "A")])  # NeMo's one shared A
        assert tensors[lora_key(layer, "self_attn.q_proj", "B")].shape == (6 * d, 8)
        assert tensors[lora_key(layer, "self_attn.k_proj", "B")].shape == (2 * d, 8)
        assert tensors[lora_key(layer, "mlp.gate_proj", "B")].shape == (100, 8)
        assert tensors[lora_key(layer, "mlp.down_proj", "A")].shape == (8, 100)
    # trained for 3 steps: B is no longer its zero init, so the logit check below means something
    assert float(tensors[lora_key(1, "self_attn.v_proj", "B")].abs().sum()) > 0


@pytest.mark.slow
def test_peft_matches_nemo_lora_logits(nemo_lora):
    r = _run(["-m", "convert.verify", "--hf", str(nemo_lora["model"]), "--nemo", str(nemo_lora["ckpt"]),
              "--adapter", str(nemo_lora["adapter"]), "--json", str(nemo_lora["base"] / "verify.json")])
    report = json.loads((nemo_lora["base"] / "verify.json").read_text())
    assert report["ok"] and report["max_abs_diff"] <= 1e-4 and report["argmax_agree_min"] == 1.0
    assert report["lora_matrices_merged"] == 2 * 4
    assert "OK" in r.stderr


@pytest.mark.slow
def test_wrong_qkv_split_is_caught(nemo_lora, tmp_path):
    cfg, tensors = read_adapter(nemo_lora["adapter"])
    k, v = lora_key(0, "self_attn.k_proj", "B"), lora_key(0, "self_attn.v_proj", "B")
    tensors[k], tensors[v] = tensors[v], tensors[k]  # what a naive [q; k; v] reading gets wrong
    bad = write_adapter(tmp_path / "bad", tensors, cfg)
    r = _run(["-m", "convert.verify", "--hf", str(nemo_lora["model"]), "--nemo", str(nemo_lora["ckpt"]),
              "--adapter", str(bad)], check=False)
    assert r.returncode == 1 and "FAIL" in r.stderr


@pytest.mark.slow
def test_adapter_equals_merged_model(nemo_lora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[5, 17, 33, 2, 9, 60, 61, 7]])
    base = AutoModelForCausalLM.from_pretrained(nemo_lora["model"], torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(nemo_lora["adapter"])).eval()
    with torch.no_grad():
        with_adapter = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    assert float((with_adapter - merged).abs().max()) <= 1e-4


def test_errors_name_the_problem(tmp_path):
    assert lora_to_peft_main(["--lora", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    (tmp_path / "exists").mkdir()
    write_adapter(tmp_path / "a", {lora_key(0, "self_attn.q_proj", "A"): torch.zeros(2, 4)},
                  {"peft_type": "LORA", "r": 2})
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_adapter(tmp_path / "a", {}, {})
    assert (tmp_path / "a" / ADAPTER_CONFIG).is_file() and (tmp_path / "a" / ADAPTER_WEIGHTS).is_file()
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter"):
        read_adapter(tmp_path / "exists")
