"""convert.nim: a real (tiny, peft) adapter and a full tiny model lay out and validate; each known way
to break NIM serving (rank over the limit, unsupported target, missing file, no chat template,
truncated vocab, pad = eos) gives its one problem line, exit 2 and no output; the printed docker
lines hold the paths."""
import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from convert.nim import (layout_adapters, main as nim_main, validate_ft_model,
                         validate_peft_source)
from test_merge import make_adapter  # tests/ is on sys.path (pytest's default prepend import mode)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("nim")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return {"ok": make_adapter(tiny_model_dir, base / "style-a", r=8),
                "big": make_adapter(tiny_model_dir, base / "big", r=32, targets=["q_proj", "v_proj"]),
                # peft warns that lm_head is tied to the embeddings: that is exactly the unsupported case
                "lm_head": make_adapter(tiny_model_dir, base / "head", r=4, targets=["q_proj", "lm_head"])}


def _run(argv, capsys):
    rc = nim_main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_real_adapter_passes_and_prints_env(adapters, tmp_path, capsys):
    out = tmp_path / "loras"
    rc, stdout, err = _run(["--adapter", adapters["ok"], "--adapter", adapters["big"], "--name", "house-style",
                            "--name", "big", "--output", out, "--max-lora-rank", 32], capsys)
    assert rc == 0, err
    for name in ("house-style", "big"):
        assert {p.name for p in (out / name).iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    assert (out / "house-style" / ADAPTER_WEIGHTS).read_bytes() == (adapters["ok"] / ADAPTER_WEIGHTS).read_bytes()
    assert validate_peft_source(out, 32) == []
    assert f"LOCAL_PEFT_DIRECTORY={out.resolve()}" in stdout
    assert "NIM_PEFT_SOURCE" in stdout and "NIM_MAX_LORA_RANK=32" in stdout and "NIM_PEFT_REFRESH_INTERVAL" in stdout
    # default name: the adapter dir's name
    layout_adapters([adapters["ok"]], tmp_path / "one")
    assert (tmp_path / "one" / "style-a" / ADAPTER_CONFIG).is_file()


def test_rank_over_limit(adapters, tmp_path, capsys):
    rc, _, err = _run(["--adapter", adapters["big"], "--output", tmp_path / "o"], capsys)
    assert rc == 2
    assert "big: LoRA rank r=32 exceeds max LoRA rank 16" in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


def test_unsupported_target(adapters, tmp_path, capsys):
    rc, _, err = _run(["--adapter", adapters["lm_head"], "--output", tmp_path / "o"], capsys)
    assert rc == 2
    assert "head/adapter_config.json: target modules ['lm_head'] are not supported by NIM" in err
    assert "LoRA tensors on modules ['lm_head']" in err
    assert not (tmp_path / "o").exists()


def test_missing_file_and_bad_dtype(adapters, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy2(adapters["ok"] / ADAPTER_CONFIG, broken / ADAPTER_CONFIG)
    rc, _, err = _run(["--adapter", broken, "--output", tmp_path / "o"], capsys)
    assert rc == 2 and "broken/adapter_model.safetensors: missing" in err

    int8 = tmp_path / "int8"
    int8.mkdir()
    shutil.copy2(adapters["ok"] / ADAPTER_CONFIG, int8 / ADAPTER_CONFIG)
    save_file({k: v.to(torch.int8) for k, v in load_file(adapters["ok"] / ADAPTER_WEIGHTS).items()},
              int8 / ADAPTER_WEIGHTS)
    rc, _, err = _run(["--adapter", int8, "--output", tmp_path / "o"], capsys)
    assert rc == 2 and "int8/adapter_model.safetensors: tensor dtype ['I8']" in err


# --- full model --------------------------------------------------------------------------------

def test_full_model_passes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    rc, stdout, err = _run(["--model", tiny_model_dir, "--output", out, "--name", "house-8b"], capsys)
    assert rc == 0, err
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert "build_info.json" not in names  # only what NIM reads
    assert validate_ft_model(out) == []
    assert f"LOCAL_FT_MODEL={out.resolve()}" in stdout
    for env in ("NIM_FT_MODEL=", "NIM_SERVED_MODEL_NAME=house-8b", "NIM_CUSTOM_MODEL_NAME=house-8b"):
        assert env in stdout


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, **changes):
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def test_no_chat_template(tiny_model_dir, tmp_path, capsys):
    m = _copy_model(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    assert cfg.pop("chat_template")
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    (m / "chat_template.jinja").unlink(missing_ok=True)
    rc, _, err = _run(["--model", m, "--output", tmp_path / "o"], capsys)
    assert rc == 2 and "tokenizer_config.json: no chat_template" in err
    assert not (tmp_path / "o").exists()


def test_truncated_vocab(tiny_model_dir, tmp_path, capsys):
    m = _copy_model(tiny_model_dir, tmp_path / "m")
    rows = json.loads((m / "config.json").read_text())["vocab_size"]
    _edit_json(m / "config.json", vocab_size=rows - 8)  # like 128256 -> 128000
    rc, _, err = _run(["--model", m, "--output", tmp_path / "o"], capsys)
    assert rc == 2
    assert f"config.json: vocab_size {rows - 8} != {rows} rows of model.embed_tokens.weight" in err


def test_pad_equals_eos_and_missing_weights(tiny_model_dir, tmp_path):
    m = _copy_model(tiny_model_dir, tmp_path / "m")
    eos = json.loads((m / "config.json").read_text())["eos_token_id"]
    _edit_json(m / "config.json", pad_token_id=eos)
    assert any("pad_token_id" in p and "equals eos_token_id" in p for p in validate_ft_model(m))
    (m / "model.safetensors").unlink()
    assert any(p.startswith("model.safetensors: missing") for p in validate_ft_model(m))


def test_existing_output_refused(adapters, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    rc, _, err = _run(["--adapter", adapters["ok"], "--output", out], capsys)
    assert rc == 2 and "already exists" in err
    assert layout_adapters([adapters["ok"]], out, overwrite=True) == out


def test_layout_report_for_demo(adapters, tmp_path):
    from convert.nim import layout_report
    ok = layout_report([adapters["ok"]], tmp_path / "nim", ["nemo-lora"])
    assert ok["ok"] and ok["problems"] == [] and (tmp_path / "nim" / "nemo-lora" / ADAPTER_WEIGHTS).is_file()
    assert any(str((tmp_path / "nim").resolve()) in line for line in ok["docker"])
    bad = layout_report([adapters["big"]], tmp_path / "nim2", ["big"])
    assert not bad["ok"] and "exceeds max LoRA rank 16" in bad["problems"][0] and not (tmp_path / "nim2").exists()
