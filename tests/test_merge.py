"""convert.merge: a random non-zero LoRA merged into a tiny model gives the peft model's logits, the
output is safetensors-only with the base's tokenizer (chat template) and generation config, and bad
input or an existing output is refused with a message naming the file."""
import json

import pytest
import torch

from convert.adapters import ADAPTER_WEIGHTS
from convert.merge import MergeError, main as merge_main, merge

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir, out_dir, *, r=4, targets=TARGETS, seed=1):
    """A peft LoRA on ``base_dir`` with random (non-zero) B, saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # init is zero: a merge of zeros would prove nothing
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("merge") / "adapter")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_logits_match_peft(tiny_model_dir, adapter_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge(tiny_model_dir, adapter_dir, tmp_path / "merged")
    ids = torch.randint(3, 900, (2, 17), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    base_logits = _logits(base, ids)
    ref = _logits(PeftModel.from_pretrained(base, adapter_dir).eval(), ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval(), ids)
    assert (ref - base_logits).abs().max() > 1e-2  # the adapter really changes the output
    assert (got - ref).abs().max() <= 1e-4

    names = {p.name for p in out.iterdir()}
    assert any(n.endswith(".safetensors") for n in names)
    assert not any(n.endswith(".bin") for n in names), names
    assert "generation_config.json" in names and "config.json" in names
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id
    assert not list(tmp_path.glob(".merged.tmp-*"))  # no temp dir left behind


def test_refuses_existing_output_and_overwrites_on_request(tiny_model_dir, adapter_dir, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="already exists"):
        merge(tiny_model_dir, adapter_dir, out)
    assert (out / "keep.txt").is_file()
    assert merge_main(["--base", str(tiny_model_dir), "--adapter", str(adapter_dir), "--output", str(out)]) == 2
    merge(tiny_model_dir, adapter_dir, out, overwrite=True, dtype="bfloat16")
    assert not (out / "keep.txt").exists()
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "BF16"


def test_output_inside_input_is_refused(tiny_model_dir, adapter_dir):
    with pytest.raises(FileExistsError, match="overlaps the input"):
        merge(tiny_model_dir, adapter_dir, adapter_dir / "merged")


def test_missing_and_corrupt_adapter_named(tiny_model_dir, adapter_dir, tmp_path, capsys):
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    with pytest.raises(MergeError, match=r"adapter_model\.safetensors: missing"):
        merge(tiny_model_dir, missing, tmp_path / "out1")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    (corrupt / ADAPTER_WEIGHTS).write_bytes((adapter_dir / ADAPTER_WEIGHTS).read_bytes()[:40])
    rc = merge_main(["--base", str(tiny_model_dir), "--adapter", str(corrupt), "--output", str(tmp_path / "out2")])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(corrupt / ADAPTER_WEIGHTS) in err and "safetensors" in err
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
