"""The DGX H100 configs: each one validates, names the source of its values, and builds its NeMo recipe and
launch script in a dry run on CPU (no model weights, no GPU); every command of the README's DGX section exists
and runs its --help or dry run."""
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from benchmarks.gpu_smoke import smoke_architecture
from recipes import launch
from recipes.config import load_config
from recipes.memory import Layout, estimate, resolve_architecture
from recipes.validate import layout_problems, validate

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ["swallow_8b_lora", "swallow_8b_sft", "swallow_70b_lora", "llama31_70b_lora", "qwen25_72b_lora",
              "athene_v2_lora", "swallow_70b_sft", "mistral_7b_lora"]
EXPECTED = {  # name: (architecture, method, TP, PP, nodes)
    "swallow_8b_lora": ("llama31_8b", "lora", 1, 1, 1), "swallow_8b_sft": ("llama31_8b", "sft", 2, 1, 1),
    "swallow_70b_lora": ("llama31_70b", "lora", 8, 1, 1), "llama31_70b_lora": ("llama31_70b", "lora", 8, 1, 1),
    "qwen25_72b_lora": ("qwen25_72b", "lora", 8, 1, 1), "athene_v2_lora": ("qwen25_72b", "lora", 8, 1, 1),
    "swallow_70b_sft": ("llama31_70b", "sft", 8, 4, 4), "mistral_7b_lora": ("mistral_7b", "lora", 1, 1, 1),
}


def path_of(name: str) -> Path:
    return ROOT / "nemo_configs" / f"{name}.yaml"


def executor_for(cfg):
    if cfg.parallel.num_nodes > 1:
        return launch.slurm_executor(cfg, account="acct", partition="batch", packager="none")
    return launch.local_executor(cfg)


@pytest.mark.parametrize("name", PRODUCTION)
def test_config_is_a_dgx_h100_layout_that_validates(name, tmp_path):
    cfg = load_config(path_of(name), [f"model.hf_path={tmp_path / 'not-downloaded'}"])
    arch_key, method, tp, pp, nodes = EXPECTED[name]
    assert resolve_architecture(cfg)[0].key == arch_key and cfg.method == method
    p = cfg.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.num_nodes) == (tp, pp, nodes)
    assert cfg.train.num_devices == 8 and cfg.train.precision == "bf16-mixed"
    assert validate(cfg) == []


@pytest.mark.parametrize("name", PRODUCTION)
def test_every_value_names_its_source(name):
    """Each hyperparameter and parallelism line carries a comment (recipe default, or why it differs)."""
    text = path_of(name).read_text(encoding="utf-8")
    assert f"nemo_configs/{name}.yaml" in text.split("\nname:")[0], "the header shows how to run this file"
    section, missing = None, []
    for line in text.splitlines():
        if re.match(r"^[a-z_]+:\s*(#.*)?$", line):
            section = line.split(":")[0]
            continue
        m = re.match(r"^  ([a-z_0-9]+):\s*\S", line)
        if not m:
            continue
        key = m.group(1)
        required = section in ("lora", "optim", "parallel") or (
            section == "train" and key in ("max_steps", "micro_batch_size", "global_batch_size", "seq_length",
                                           "precision", "num_devices"))
        if required and "#" not in line:
            missing.append(f"{section}.{key}")
    assert not missing, f"{name}: no source comment on {missing}"


@pytest.mark.parametrize("name", PRODUCTION)
def test_dry_run_builds_recipe_and_launch_script_without_the_model(name, tmp_path):
    cfg = load_config(path_of(name), [f"model.hf_path={tmp_path / 'not-downloaded'}",
                                      f"output_dir={tmp_path / 'run'}"])
    text, problems = launch.dry_run(cfg, executor_for(cfg))
    assert problems == []
    t, p = cfg.train, cfg.parallel
    for needle in ("Partial[train(", "Partial[finetune(", f"devices={t.num_devices}", "accelerator='gpu'",
                   f"tensor_model_parallel_size={p.tensor_model_parallel_size}",
                   f"pipeline_model_parallel_size={p.pipeline_model_parallel_size}",
                   f"sequence_parallel={p.sequence_parallel}", "precision='bf16-mixed'", f"max_steps={t.max_steps}",
                   f"global_batch_size={t.global_batch_size}", f"seq_length={t.seq_length}", "peak:",
                   "config.json at launch"):
        assert needle in text, needle
    if cfg.method == "lora":
        assert f"dim={cfg.lora.dim}" in text and f"alpha={cfg.lora.alpha}" in text
    else:
        assert "peft=None" in text
    if p.num_nodes > 1:
        assert f"#SBATCH --nodes={p.num_nodes}" in text and "--container-image nvcr.io/nvidia/nemo:24.12" in text
    else:
        assert f"--nproc-per-node {t.num_devices}" in text
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# with the model's config.json present (what the run builds); these find gaps in recipes.nemo_backend


def _fake_hf_dir(tmp_path: Path, cfg) -> Path:
    from recipes.memory import ARCHITECTURES, named_architecture
    d = tmp_path / Path(cfg.model.hf_path).name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(ARCHITECTURES[named_architecture(cfg)[0]].to_hf_config()))
    return d


def _model_recipe(name: str, tmp_path: Path):
    cfg = load_config(path_of(name), [f"output_dir={tmp_path / 'run'}"])
    cfg = cfg.replace(**{"model.hf_path": str(_fake_hf_dir(tmp_path, cfg))})
    task, note = launch.launch_task(cfg, cpu=False)
    return cfg, task, note


@pytest.mark.parametrize("name", PRODUCTION)
def test_model_config_is_built_from_the_real_shape(name, tmp_path):
    cfg, task, note = _model_recipe(name, tmp_path)
    m = task.recipe.model.config
    arch = resolve_architecture(cfg)[0]
    assert note is None
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size) == (
        arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.num_query_groups, arch.ffn_hidden_size)
    assert m.seq_length == cfg.train.seq_length
    if arch.rope_scaling:  # Llama 3.1 rope scaling
        assert m.scale_factor == 8.0
    if arch.vocab_is_preset:  # Qwen2: the real 152064-row vocabulary, fixed (not padded)
        assert m.vocab_size == arch.vocab_size == 152064
    else:  # Megatron pads the vocab (recipes.memory.padded_vocab)
        assert m.make_vocab_size_divisible_by == arch.make_vocab_size_divisible_by
    if arch.family == "mistral":  # v0.3: no sliding window (MistralConfig7B's default [4096, 0] overridden)
        assert m.window_size is None


@pytest.mark.parametrize("name", PRODUCTION)
def test_recipe_follows_nodes_and_distributed_optimizer_of_the_config(name, tmp_path):
    cfg = load_config(path_of(name), [f"model.hf_path={tmp_path / 'x'}", f"output_dir={tmp_path / 'run'}"])
    task, _ = launch.launch_task(cfg, cpu=False)
    assert task.recipe.trainer.num_nodes == cfg.parallel.num_nodes
    assert task.recipe.trainer.devices == cfg.train.num_devices
    assert task.recipe.optim.config.use_distributed_optimizer == cfg.parallel.use_distributed_optimizer


# ---------------------------------------------------------------------------------------------
# the README's "Run on a DGX H100" section


def dgx_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^## Run on a DGX H100\n(.*?)(?=^## |\Z)", readme, flags=re.S | re.M)
    assert m, "README.md has no '## Run on a DGX H100' section"
    return m.group(0)


def doc_commands() -> list[str]:
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", dgx_section(), flags=re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split("  #")[0].strip()
            if cmd:
                cmds.append(cmd)
    return cmds


def _argv(cmd: str, models_dir: Path) -> list[str]:
    """The command's argv as the shell would pass it, with $MODELS and $PWD (the repo root) expanded."""
    return [a.replace("$MODELS", str(models_dir)).replace("$PWD", str(ROOT)) for a in shlex.split(cmd)]


def _main_of(module: str):
    import importlib
    return importlib.import_module(module).main


def _help_ok(module: str, subcommand: str | None = None) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        _main_of(module)([subcommand, "--help"] if subcommand else ["--help"])
    assert e.value.code == 0, module
    return out.getvalue()


def test_dgx_section_covers_data_to_nim_adapter():
    text = dgx_section()
    cmds = doc_commands()
    modules = {m for c in cmds for m in re.findall(r"python -m ([a-z_.]+)", c)}
    assert {"recipes.validate", "recipes.prepare_data", "recipes.nemo_backend", "recipes.finetune",
            "convert.lora_to_peft", "recipes.generate", "benchmarks.bleu"} <= modules
    for env in ("NIM_PEFT_SOURCE", "LOCAL_PEFT_DIRECTORY", "NIM_MAX_LORA_RANK", "NIM_PEFT_REFRESH_INTERVAL"):
        assert env in text
    assert any(c.startswith("docker build -f Dockerfile.nemo") for c in cmds) and (ROOT / "Dockerfile.nemo").is_file()
    for name in PRODUCTION:
        assert f"{name}.yaml" in text


@pytest.mark.parametrize("module", sorted({m for c in doc_commands() for m in re.findall(r"python -m ([a-z_.]+)", c)}))
def test_every_module_the_section_runs_has_a_working_help(module):
    assert "usage:" in _help_ok(module)


@pytest.mark.parametrize("cmd", [c for c in doc_commands() if c.startswith("python -m ")])
def test_every_option_the_section_uses_exists(cmd):
    """Typos in an option fail here, also for commands that cannot run on this machine (training, export)."""
    module, first = cmd.split()[2], (cmd.split()[3:] or [""])[0]
    help_text = _help_ok(module)
    if re.search(r"\{[a-z,]*\b%s\b[a-z,]*\}" % re.escape(first), help_text):  # a subcommand, e.g. `import`
        help_text = _help_ok(module, first)
    if module == "recipes.finetune" and not _finetune_is_wired():
        help_text += launch_parser().format_help()
    for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", cmd):
        assert opt in help_text, f"{module} has no {opt}"


@pytest.mark.parametrize("cmd", [c for c in doc_commands() if "recipes.finetune" in c and "--dry-run" not in c])
def test_section_launch_commands_build_their_executor(cmd, tmp_path):
    """The real launch lines, up to the point where they would start training."""
    args = [str(ROOT / a) if a.endswith(".yaml") else a for a in _argv(cmd, tmp_path / "models")[3:]]
    ns = launch_parser().parse_intermixed_args(args)
    cfg = load_config(ns.config, ns.overrides)
    assert launch.build_executor(ns, cfg) is not None and validate(cfg) == []


def _finetune_is_wired() -> bool:
    return "--executor" in _help_ok("recipes.finetune")


@pytest.mark.parametrize("cmd", [c for c in doc_commands() if "recipes.validate" in c or "--dry-run" in c])
def test_section_dry_runs_and_validations_succeed(cmd, tmp_path, capsys):
    argv = _argv(cmd, tmp_path / "models")
    assert argv[:2] == ["python", "-m"]
    module, args = argv[2], argv[3:]
    if module == "recipes.validate":
        assert _main_of(module)([str(ROOT / a) if a.endswith(".yaml") else a for a in args]) == 0
        return
    assert module == "recipes.finetune"
    args = [str(ROOT / a) if a.endswith(".yaml") else a for a in args]
    args += [f"output_dir={tmp_path / 'run'}"]
    if _finetune_is_wired():
        assert _main_of(module)(args) == 0
    else:  # until recipes.finetune calls recipes.launch: the same arguments through recipes.launch
        ap = launch_parser()
        ns = ap.parse_intermixed_args(args)
        cfg = load_config(ns.config, ns.overrides)
        assert launch.run_with_executor(ns, cfg) == 0
    out = capsys.readouterr().out
    assert "Partial[finetune(" in out and "OK" in out


def launch_parser():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--backend", choices=["hf", "nemo"], required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("overrides", nargs="*")
    launch.add_executor_args(ap)
    return ap


def test_gpu_smoke_dry_run(tmp_path):
    cmd = [c for c in doc_commands() if "gpu_smoke.sh" in c]
    assert cmd == ["bash benchmarks/gpu_smoke.sh", "bash benchmarks/gpu_smoke.sh --bundle dist/gpu-bundle"]
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks/gpu_smoke.sh")], check=True)
    r = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_smoke.sh"), "--dry-run", "--method", "both",
                        "--output", str(tmp_path / "smoke")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHON": os.environ.get("PYTHON", str(ROOT / ".venv/bin/python"))
                            if (ROOT / ".venv/bin/python").exists() else "python"})
    assert r.returncode == 0, r.stderr
    assert "4 layers, hidden 4096, 32 heads / 8 KV groups, FFN 14336" in r.stdout
    assert "benchmarks.train_speed" in r.stdout and "recipes.models tiny" in r.stdout
    for method in ("lora", "sft"):
        cfg = load_config(tmp_path / "smoke" / f"gpu_smoke_8b_{method}.yaml")
        assert cfg.world_size == 1 and cfg.parallel.tensor_model_parallel_size == 1 and cfg.method == method
        assert cfg.train.precision == "bf16-mixed" and layout_problems(cfg) == []
        assert estimate(smoke_architecture(4), Layout.from_config(cfg)).fits(80)


def test_section_table_matches_the_estimator():
    """The per-GPU peaks quoted in the section are what recipes.validate prints (rounded to 1 GiB)."""
    rows = re.findall(r"^\| `([a-z0-9_]+)\.yaml` \|.*\| (\d+) GiB \|$", dgx_section(), flags=re.M)
    assert sorted(name for name, _ in rows) == sorted(PRODUCTION)
    for name, gib in rows:
        cfg = load_config(path_of(name))
        assert abs(estimate(resolve_architecture(cfg)[0], Layout.from_config(cfg)).total_gib - int(gib)) <= 1, name
