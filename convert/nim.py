"""Lay out fine-tuned outputs the way NVIDIA NIM (and vLLM) load them, validate them, print `docker run`.

    python -m convert.nim --adapter out/hf_adapter [--adapter DIR ...] --output out/nim/loras \\
        [--name NAME ...] [--max-lora-rank 16] [--overwrite]
    python -m convert.nim --model out/merged --output out/nim/model [--name NAME] [--overwrite]

* ``--adapter``: a NIM_PEFT_SOURCE tree — one sub-directory per adapter (named by ``--name``, else by
  the adapter dir's name; that name is the model name clients request), each holding a copy of
  ``adapter_config.json`` + ``adapter_model.safetensors`` (HF PEFT format: the only LoRA format NIM
  2.x documents; a NeMo 2 checkpoint dir is not accepted).
* ``--model``: a NIM_FT_MODEL dir — a full HF checkpoint: config.json, safetensors (+ index when
  sharded), generation_config.json and the tokenizer files with a chat template.

The tree is built in a temp dir beside ``--output`` and VALIDATED there before it is renamed into
place, so an invalid layout is never left looking complete. Checks (each problem is one line naming
the file; any problem -> exit 2, nothing written): files present; LoRA target modules among those NIM
supports (q/k/v/o_proj, gate/up/down_proj) and no non-LoRA tensors (modules_to_save); rank r <=
``--max-lora-rank`` (default 16 = vLLM's ``max_lora_rank`` default, which NIM passes on as
NIM_MAX_LORA_RANK: "LoRA rank X is greater than max_lora_rank" otherwise); tensor dtype float16,
bfloat16 or float32; for a full model: the tokenizer has a chat template (without one, chat
completions fail with recent transformers), config.json vocab_size equals the embedding (and
lm_head) rows in the safetensors (catches the Llama 3.1 128256 -> 128000 export truncation), and
pad != eos (pad = eos masks the real end token, so the fine-tune never learns to stop).
On success it prints the host/`docker run` lines to serve the result; the image is a placeholder
(``--image``) the user fills in. Facts: shared/reference/nim-and-serving.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import families
from convert.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from convert.merge import TOKENIZER_FILES
from recipes.fileio import atomic_dir

# The HF modules the registered families' LoRA targets become (families.ModelFamily.lora_modules): the
# attention and MLP projections q/k/v/o_proj, gate/up/down_proj that NIM documents for HF PEFT adapters.
NIM_LORA_TARGETS = tuple(sorted({m for f in families.all_families() for lm in f.lora_modules().values()
                                 for m in lm.hf_modules}))
DEFAULT_MAX_LORA_RANK = 16  # vLLM's max_lora_rank default
OK_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
IMAGE_PLACEHOLDER = "<NIM_IMAGE e.g. nvcr.io/nim/<org>/<model>:<tag>>"
PEFT_MOUNT = "/opt/nim/loras"          # where the tree appears inside the container
MODEL_MOUNT = "/opt/nim/ft-model"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LORA_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


class NimLayoutError(ValueError):
    """The laid-out tree failed validation; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# ---------------------------------------------------------------------------------------------
# reading without loading tensors


def safetensors_header(path: Path) -> dict[str, dict]:
    """``{tensor name: {"dtype", "shape"}}`` from a safetensors header (no tensor data is read:
    fine for a 70B shard). A truncated or non-safetensors file raises ValueError naming it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 * 2**20):
            raise ValueError(f"{path}: not a safetensors file (header length {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    return header


def _read_json(path: Path, problems: list[str], rel: str) -> dict | None:
    if not path.is_file():
        problems.append(f"{rel}: missing")
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{rel}: not valid JSON ({e})")
        return None
    if not isinstance(obj, dict):
        problems.append(f"{rel}: expected a JSON object")
        return None
    return obj


# ---------------------------------------------------------------------------------------------
# validation


def _validate_adapter(d: Path, rel: str, max_lora_rank: int) -> tuple[list[str], int]:
    """Problems of one adapter dir (paths shown as ``rel/...``) and its largest rank."""
    problems: list[str] = []
    cfg = _read_json(d / ADAPTER_CONFIG, problems, f"{rel}/{ADAPTER_CONFIG}")
    w_path = d / ADAPTER_WEIGHTS
    if not w_path.is_file():
        problems.append(f"{rel}/{ADAPTER_WEIGHTS}: missing")
    rank = 0
    if cfg is not None:
        crel = f"{rel}/{ADAPTER_CONFIG}"
        if cfg.get("peft_type") != "LORA":
            problems.append(f"{crel}: peft_type is {cfg.get('peft_type')!r}, NIM serves 'LORA' adapters only")
        targets = cfg.get("target_modules")
        if not isinstance(targets, list) or not targets:
            problems.append(f"{crel}: target_modules is {targets!r}; NIM needs an explicit list "
                            f"(supported: {', '.join(NIM_LORA_TARGETS)})")
        else:
            bad = sorted(set(map(str, targets)) - set(NIM_LORA_TARGETS))
            if bad:
                problems.append(f"{crel}: target modules {bad} are not supported by NIM "
                                f"(supported: {', '.join(NIM_LORA_TARGETS)})")
        ranks = [cfg.get("r")] + list((cfg.get("rank_pattern") or {}).values())
        if not all(isinstance(r, int) and r > 0 for r in ranks):
            problems.append(f"{crel}: r must be a positive integer, got {cfg.get('r')!r}")
        else:
            rank = max(ranks)
        if cfg.get("modules_to_save"):
            problems.append(f"{crel}: modules_to_save={cfg['modules_to_save']} — NIM/vLLM load only LoRA A/B matrices")
        if cfg.get("use_dora"):
            problems.append(f"{crel}: use_dora=true — DoRA adapters are not served by NIM/vLLM; merge it instead")
    if w_path.is_file():
        wrel = f"{rel}/{ADAPTER_WEIGHTS}"
        try:
            header = safetensors_header(w_path)
        except ValueError as e:
            problems.append(str(e).replace(str(w_path), wrel))
            header = {}
        bad_modules, bad_dtypes = set(), set()
        for key, info in header.items():
            m = _LORA_KEY_RE.match(key)
            if m is None:
                problems.append(f"{wrel}: tensor {key} is not a LoRA A/B matrix (NIM/vLLM load only lora_A/lora_B)")
                continue
            module = m["module"].rsplit(".", 1)[-1]
            if module not in NIM_LORA_TARGETS:
                bad_modules.add(module)
            if info.get("dtype") not in OK_DTYPES:
                bad_dtypes.add(str(info.get("dtype")))
            if m["which"] == "A" and info.get("shape"):
                rank = max(rank, int(info["shape"][0]))  # A is [r, in]: the true rank, whatever the config says
        if bad_modules:
            problems.append(f"{wrel}: LoRA tensors on modules {sorted(bad_modules)} are not supported by NIM "
                            f"(supported: {', '.join(NIM_LORA_TARGETS)})")
        if bad_dtypes:
            problems.append(f"{wrel}: tensor dtype {sorted(bad_dtypes)}; NIM needs float16, bfloat16 or float32")
        if header and not any(".lora_A" in k for k in header):
            problems.append(f"{wrel}: holds no lora_A tensors")
    if rank > max_lora_rank:
        problems.append(f"{rel}: LoRA rank r={rank} exceeds max LoRA rank {max_lora_rank}; serve with "
                        f"NIM_MAX_LORA_RANK>={rank} (--max-lora-rank {rank}) or retrain with a smaller r")
    return problems, rank


def validate_peft_source(root: str | Path, max_lora_rank: int = DEFAULT_MAX_LORA_RANK) -> list[str]:
    """Problems of a NIM_PEFT_SOURCE tree (one adapter per sub-directory); [] when it is servable."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: not a directory"]
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        return [f"{root}: no adapter sub-directories (NIM_PEFT_SOURCE needs one dir per adapter)"]
    problems: list[str] = []
    for p in sorted(x for x in root.iterdir() if x.is_file()):
        problems.append(f"{p.name}: a file at the top of NIM_PEFT_SOURCE; only adapter sub-directories belong there")
    for sub in subdirs:
        if not _NAME_RE.match(sub.name):
            problems.append(f"{sub.name}: adapter name must be letters, digits, '.', '_' or '-' (clients request it)")
        problems += _validate_adapter(sub, sub.name, max_lora_rank)[0]
    return problems


def _token_string(tok_cfg: dict, name: str) -> str | None:
    v = tok_cfg.get(name)
    return v.get("content") if isinstance(v, dict) else v


def _ids(v) -> set[int]:
    if isinstance(v, int):
        return {v}
    return {x for x in v if isinstance(x, int)} if isinstance(v, list) else set()


def validate_ft_model(model_dir: str | Path) -> list[str]:
    """Problems of a NIM_FT_MODEL dir (a full HF checkpoint); [] when it is servable."""
    d = Path(model_dir)
    if not d.is_dir():
        return [f"{d}: not a directory"]
    problems: list[str] = []
    config = _read_json(d / "config.json", problems, "config.json")
    gen = _read_json(d / "generation_config.json", problems, "generation_config.json") or {}

    # weights: one model.safetensors, or an index naming its shards
    index_path = d / "model.safetensors.index.json"
    shards: list[Path] = []
    if index_path.is_file():
        index = _read_json(index_path, problems, index_path.name) or {}
        weight_map = index.get("weight_map") or {}
        if not weight_map:
            problems.append(f"{index_path.name}: no weight_map")
        for shard in sorted(set(weight_map.values())):
            if (d / shard).is_file():
                shards.append(d / shard)
            else:
                problems.append(f"{shard}: missing (listed in {index_path.name})")
    elif (d / "model.safetensors").is_file():
        shards = [d / "model.safetensors"]
    else:
        extra = " (only pickle .bin weights: re-save with safe_serialization=True)" if list(d.glob("*.bin")) else ""
        problems.append(f"model.safetensors: missing, and no model.safetensors.index.json{extra}")
    tensors: dict[str, dict] = {}
    for shard in shards:
        try:
            tensors.update(safetensors_header(shard))
        except ValueError as e:
            problems.append(str(e).replace(str(shard), shard.name))
    bad_dtypes = sorted({str(t.get("dtype")) for t in tensors.values()} - set(OK_DTYPES))
    if bad_dtypes:
        problems.append(f"safetensors: tensor dtype {bad_dtypes}; NIM needs float16, bfloat16 or float32")

    if config is not None and tensors:
        vocab = config.get("vocab_size")
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in tensors and tensors[name]["shape"][0] != vocab:
                problems.append(f"config.json: vocab_size {vocab} != {tensors[name]['shape'][0]} rows of {name} "
                                f"in the safetensors (truncated or padded embeddings)")
        if "model.embed_tokens.weight" not in tensors:
            problems.append("safetensors: no model.embed_tokens.weight; cannot check vocab_size")

    # tokenizer: files and chat template
    tok_cfg = _read_json(d / "tokenizer_config.json", problems, "tokenizer_config.json") or {}
    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer.model").is_file():
        problems.append("tokenizer.json: missing (nor tokenizer.model)")
    has_template = bool(tok_cfg.get("chat_template")) or (d / "chat_template.jinja").is_file() \
        or (d / "chat_template.json").is_file()
    if (d / "tokenizer_config.json").is_file() and not has_template:
        problems.append("tokenizer_config.json: no chat_template (nor chat_template.jinja); "
                        "NIM chat completions fail without it")

    # pad must not be eos
    if config is not None:
        pad_ids = _ids(config.get("pad_token_id")) | _ids(gen.get("pad_token_id"))
        eos_ids = _ids(config.get("eos_token_id")) | _ids(gen.get("eos_token_id"))
        if pad_ids & eos_ids:
            problems.append(f"config.json: pad_token_id {sorted(pad_ids)} equals eos_token_id {sorted(eos_ids)}; "
                            f"pad must be a distinct token")
    pad_s, eos_s = _token_string(tok_cfg, "pad_token"), _token_string(tok_cfg, "eos_token")
    if pad_s is not None and pad_s == eos_s:
        problems.append(f"tokenizer_config.json: pad_token {pad_s!r} equals eos_token; pad must be a distinct token")
    return problems


# ---------------------------------------------------------------------------------------------
# layout


def _copy(src: Path, dst: Path, link: bool) -> None:
    """Copy (or hard-link, for multi-GB shards on the same filesystem) one file."""
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem: fall back to a copy
    shutil.copy2(src, dst)


def layout_adapters(adapters: list[str | Path], output: str | Path, names: list[str] | None = None,
                    max_lora_rank: int = DEFAULT_MAX_LORA_RANK, overwrite: bool = False) -> Path:
    """Build a validated NIM_PEFT_SOURCE tree at ``output``; raises NimLayoutError listing the problems
    (nothing is written then)."""
    adapters = [Path(a) for a in adapters]
    if not adapters:
        raise ValueError("no adapters given")
    if names is not None and len(names) != len(adapters):
        raise ValueError(f"{len(names)} names for {len(adapters)} adapters; give one --name per --adapter")
    names = list(names) if names else [a.resolve().name for a in adapters]
    problems = [f"{n}: adapter name must be letters, digits, '.', '_' or '-' (clients request it)"
                for n in names if not _NAME_RE.match(n)]
    problems += [f"{n}: name used by more than one adapter" for n in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"{a}: adapter dir not found" for a in adapters if not a.is_dir()]
    if problems:
        raise NimLayoutError(problems)
    with atomic_dir(output, overwrite, inputs=tuple(adapters), allow_empty=False) as tmp:
        for src, name in zip(adapters, names):
            (tmp / name).mkdir()
            for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                if (src / fname).is_file():  # a missing one is reported by the validation below
                    shutil.copy2(src / fname, tmp / name / fname)
        problems = validate_peft_source(tmp, max_lora_rank)
        if problems:
            raise NimLayoutError(problems)
    return Path(output)


def layout_model(model_dir: str | Path, output: str | Path, name: str | None = None, overwrite: bool = False,
                 *, link: bool = False) -> Path:
    """Build a validated NIM_FT_MODEL dir at ``output`` from a HF model dir; raises NimLayoutError."""
    src = Path(model_dir)
    if not src.is_dir():
        raise NimLayoutError([f"{src}: model dir not found"])
    if name is not None and not _NAME_RE.match(name):
        raise NimLayoutError([f"{name}: model name must be letters, digits, '.', '_' or '-'"])
    wanted = ["config.json", "generation_config.json", "model.safetensors.index.json", *TOKENIZER_FILES]
    with atomic_dir(output, overwrite, inputs=(src,), allow_empty=False) as tmp:
        for fname in wanted:
            if (src / fname).is_file():
                _copy(src / fname, tmp / fname, link)
        for shard in sorted(src.glob("*.safetensors")):
            _copy(shard, tmp / shard.name, link)
        problems = validate_ft_model(tmp)
        if problems:
            raise NimLayoutError(problems)
    return Path(output)


def layout_report(adapters: list[str | Path], output: str | Path, names: list[str] | None = None,
                  max_lora_rank: int = DEFAULT_MAX_LORA_RANK) -> dict:
    """Lay out (replacing ``output``) and return ``{"dir", "ok", "problems", "docker"}`` instead of
    raising on validation problems: for reports (recipes.demo) that show the result either way."""
    try:
        out = layout_adapters(adapters, output, names, max_lora_rank, overwrite=True)
    except NimLayoutError as e:
        return {"dir": str(output), "ok": False, "problems": e.problems, "docker": []}
    return {"dir": str(out), "ok": True, "problems": [],
            "docker": docker_env_lines(out, kind="peft", max_lora_rank=max_lora_rank)}


def docker_env_lines(path: str | Path, *, kind: str, name: str | None = None,
                     max_lora_rank: int = DEFAULT_MAX_LORA_RANK, image: str = IMAGE_PLACEHOLDER,
                     refresh_interval: int = 3600) -> list[str]:
    """Shell lines to serve ``path`` with NIM: ``kind`` "peft" (a NIM_PEFT_SOURCE tree) or "model"
    (a NIM_FT_MODEL dir). The image is a placeholder unless given."""
    path = Path(path).resolve()
    common = ["docker run -it --rm --gpus all --shm-size=16GB -p 8000:8000 \\",
              "  -e NGC_API_KEY \\",
              '  -v "$LOCAL_NIM_CACHE:/opt/nim/.cache" \\']
    if kind == "peft":
        return [f"export LOCAL_PEFT_DIRECTORY={path}",
                f"export NIM_PEFT_SOURCE={PEFT_MOUNT}",
                "export LOCAL_NIM_CACHE=~/.cache/nim",
                *common,
                "  -e NIM_PEFT_SOURCE \\",
                f"  -e NIM_MAX_LORA_RANK={max_lora_rank} \\",
                f"  -e NIM_PEFT_REFRESH_INTERVAL={refresh_interval} \\",
                '  -v "$LOCAL_PEFT_DIRECTORY:$NIM_PEFT_SOURCE" \\',
                f"  {image}",
                "# pick a LoRA profile (e.g. vllm-fp16-tp1-pp1-feat_lora); request a sub-directory name as the model"]
    if kind == "model":
        served = name or path.name
        return [f"export LOCAL_FT_MODEL={path}",
                "export LOCAL_NIM_CACHE=~/.cache/nim",
                *common,
                f"  -e NIM_FT_MODEL={MODEL_MOUNT} \\",
                f"  -e NIM_SERVED_MODEL_NAME={served} \\",
                f"  -e NIM_CUSTOM_MODEL_NAME={served} \\",
                f'  -v "$LOCAL_FT_MODEL:{MODEL_MOUNT}:ro" \\',
                f"  {image}",
                "# newer NIM releases also need -e NIM_USE_TRTLLM_LEGACY_BACKEND=1 -e NIM_DISABLE_TRTLLM_PYTORCH_RT=1"]
    raise ValueError(f"kind must be 'peft' or 'model', got {kind!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.nim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", action="append", metavar="DIR",
                     help="PEFT adapter dir (repeat for several) -> NIM_PEFT_SOURCE tree")
    src.add_argument("--model", metavar="DIR", help="full HF model dir -> NIM_FT_MODEL dir")
    ap.add_argument("--output", required=True, help="dir to create (must not exist unless --overwrite)")
    ap.add_argument("--name", action="append", metavar="NAME",
                    help="served name: one per --adapter (default: the adapter dir's name) or one for --model")
    ap.add_argument("--max-lora-rank", type=int, default=DEFAULT_MAX_LORA_RANK,
                    help="largest LoRA rank the server allows (default %(default)s = vLLM's max_lora_rank default)")
    ap.add_argument("--image", default=IMAGE_PLACEHOLDER, help="NIM container image for the printed docker run")
    ap.add_argument("--link", action="store_true", help="--model: hard-link the weight files instead of copying")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    args = ap.parse_args(argv)
    if args.max_lora_rank <= 0:
        ap.error(f"--max-lora-rank {args.max_lora_rank}: must be > 0")
    try:
        if args.model:
            if args.name and len(args.name) > 1:
                ap.error("--model takes at most one --name")
            name = args.name[0] if args.name else None
            out = layout_model(args.model, args.output, name, overwrite=args.overwrite, link=args.link)
            lines = docker_env_lines(out, kind="model", name=name or Path(args.model).resolve().name, image=args.image)
        else:
            out = layout_adapters(args.adapter, args.output, args.name, args.max_lora_rank, args.overwrite)
            lines = docker_env_lines(out, kind="peft", max_lora_rank=args.max_lora_rank, image=args.image)
    except NimLayoutError as e:
        for p in e.problems:
            print(f"problem: {p}", file=sys.stderr)
        print(f"{len(e.problems)} problem(s); nothing written to {args.output}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# wrote {out} (validated)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
