"""HF model dir -> NeMo 2 checkpoint for the NeMo backend, cached beside the HF dir, with its checks.

- :func:`import_hf` — ``convert.hf_to_nemo`` (default) or NeMo 2.1's own importer (``importer="nemo"``;
  the family may supply a fixed one), cached as ``<hf_path>-nemo`` with a marker naming the source
  files, written through :func:`recipes.fileio.atomic_dir`;
- :func:`check_imported_norms` — every RMSNorm weight of the import equals the HF one (NeMo 2.1's
  importer silently drops them with the local layer spec).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import families
from convert.nemo_ckpt import read_dist_tensors
from benchmarks.metrics import global_rank
from recipes.fileio import atomic_dir, made_by_rank_zero

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IMPORT_MARKER = "nemo_import.json"  # written last into a complete imported checkpoint
IMPORTERS = ("convert", "nemo")


def read_hf_config(hf_path: str | Path) -> dict:
    """``<hf_path>/config.json``; FileNotFoundError / ValueError naming the file."""
    p = Path(hf_path) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not found (model.hf_path must be a Hugging Face model directory)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON ({e})") from None


def family_of(hf_path: str | Path, family: str | None = None) -> tuple[families.ModelFamily, dict]:
    """(family, config.json) of a HF dir; with ``family`` (``model.family``) it must be the one the
    config.json's architectures name, and the config must be one NeMo 2.1 can hold."""
    path = Path(hf_path) / "config.json"
    hf = read_hf_config(hf_path)
    fam = families.for_hf(hf, path)
    if family is not None and fam.name != family:
        raise ValueError(f"{path}: architectures {hf.get('architectures')} (model_type {hf.get('model_type')!r}) "
                         f"is the {fam.name} family, not model.family={family!r}")
    fam.check_supported(hf, path)
    return fam, hf


def default_nemo_path(hf_path: str | Path) -> Path:
    """Where :func:`import_hf` caches the NeMo checkpoint of ``hf_path``: the sibling ``<hf_path>-nemo``."""
    p = Path(hf_path).absolute()
    return p.parent / f"{p.name}-nemo"


def _source_fingerprint(hf_path: Path) -> dict:
    """Names, sizes and sha256 of the HF files an import reads (weights hashed by size+mtime only)."""
    files = {}
    for f in sorted(hf_path.iterdir()):
        if not f.is_file():
            continue
        st = f.stat()
        if f.suffix in (".json", ".model", ".txt", ".jinja"):
            files[f.name] = {"size": st.st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        elif f.suffix in (".safetensors", ".bin"):
            files[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return files


def import_is_complete(hf_path: str | Path, nemo_path: str | Path, importer: str = "convert") -> bool:
    """True when ``nemo_path`` holds a finished import of the current files of ``hf_path`` by ``importer``."""
    marker = Path(nemo_path) / IMPORT_MARKER
    if not marker.is_file() or not (Path(nemo_path) / "weights").is_dir() or not (Path(nemo_path) / "context").is_dir():
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return (info.get("norm_check", {}).get("norms_equal") is True and info.get("importer") == importer
            and info.get("source_files") == _source_fingerprint(Path(hf_path).absolute()))



def import_hf(hf_path: str | Path, nemo_path: str | Path | None = None, family: str | None = None,
              check_norms: bool = True, importer: str = "convert") -> Path:
    """HF model dir -> NeMo 2 checkpoint dir (``context/`` + ``weights/``); returns its path.

    ``importer="convert"`` (default): ``convert.hf_to_nemo``, one layer at a time, the same tensors as
    NeMo's importer, and it also handles what 2.1.0's importers get wrong (Llama 3.1 rope_scaling,
    Qwen2.5-72B's vocab, tied Qwen2, Mistral v0.3's missing sliding window). ``"nemo"``: NeMo's own
    importer of the family (``llm.import_ckpt``, or the family's fixed copy); on a CPU it needs
    :mod:`recipes.cpu_shim` (:func:`recipes.cpu_shim.prepare_process` applies it): its converter
    patch is what keeps the norm weights. ``family`` (``model.family``), when given, must be the
    family config.json names.
    Skipped when ``nemo_path`` (default :func:`default_nemo_path`) already holds a complete import of
    the same source files by the same importer. With several processes (torchrun's RANK), rank 0 imports and
    the others wait for it (:func:`recipes.fileio.made_by_rank_zero`). Otherwise the import is written through
    :func:`recipes.fileio.atomic_dir` (a temp dir beside it), checked (the layer-norm weights must be
    the HF ones, see :func:`check_imported_norms`), marked complete and renamed into place.
    ``check_norms=False`` skips that check (only for demonstrating what the logits check catches).
    """
    if importer not in IMPORTERS:
        raise ValueError(f"importer {importer!r}: expected one of {', '.join(IMPORTERS)}")
    hf_path = Path(hf_path).absolute()
    fam, hf = family_of(hf_path, family)
    dest = Path(nemo_path).absolute() if nemo_path else default_nemo_path(hf_path)
    if import_is_complete(hf_path, dest, importer):
        return dest
    # every rank of a torchrun launch gets here: rank 0 imports, the others wait for it to land
    made_by_rank_zero(lambda: _import(hf_path, dest, fam, hf, importer, check_norms),
                      lambda: import_is_complete(hf_path, dest, importer), f"{dest} (the NeMo import of {hf_path})",
                      rank=global_rank())
    return dest


def _import(hf_path: Path, dest: Path, fam, hf: dict, importer: str, check_norms: bool) -> None:
    with atomic_dir(dest, overwrite=True, inputs=(hf_path,)) as tmp:
        # both importers write a new directory (NeMo's skips an existing one): start from none
        tmp.rmdir()
        t0 = time.perf_counter()
        if importer == "convert":
            from convert.hf_to_nemo import convert as hf_to_nemo
            hf_to_nemo(hf_path, tmp, progress=False)
        else:
            fam.nemo_importer(hf_path)(tmp)
        seconds = round(time.perf_counter() - t0, 2)
        try:
            norms = check_imported_norms(hf_path, tmp) if check_norms else {"norms_equal": "not checked"}
        except RuntimeError as e:
            raise RuntimeError(str(e).replace(str(tmp), str(dest))) from None
        info = {"source": str(hf_path), "family": fam.name, "model_type": hf.get("model_type"), "importer": importer,
                "source_files": _source_fingerprint(hf_path), "seconds": seconds, "norm_check": norms}
        (tmp / IMPORT_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def check_imported_norms(hf_path: str | Path, nemo_path: str | Path) -> dict:
    """Require every RMSNorm weight of the import to equal the HF one; returns a small report.

    The 2.1.0 importer maps norms by Transformer-Engine names; with the local (non-TE) layer spec
    it SILENTLY leaves them at their init value 1.0 (the model still loads and runs). This catches it.
    """
    import torch
    from safetensors.torch import load_file

    hf_path, weights = Path(hf_path), Path(nemo_path) / "weights"
    hf_sd = {}
    for f in sorted(hf_path.glob("*.safetensors")):
        hf_sd.update({k: v for k, v in load_file(str(f)).items() if "norm" in k})
    if not hf_sd:
        raise FileNotFoundError(f"{hf_path}: no norm weights in *.safetensors")
    n_layers = 1 + max(int(k.split(".")[2]) for k in hf_sd if k.startswith("model.layers."))
    # The dist checkpoint always uses the TE-fused names: megatron's local layer spec maps
    # input_layernorm/pre_mlp_layernorm onto them in its sharded_state_dict.
    pairs = {"input_layernorm": "module.decoder.layers.self_attention.linear_qkv.layer_norm_weight",
             "post_attention_layernorm": "module.decoder.layers.mlp.linear_fc1.layer_norm_weight"}
    got = read_dist_tensors(weights, [*pairs.values(), "module.decoder.final_layernorm.weight"])
    bad = []
    for hf_name, key in pairs.items():
        for i in range(n_layers):
            if not torch.equal(got[key][i].float(), hf_sd[f"model.layers.{i}.{hf_name}.weight"].float()):
                bad.append(f"layer {i} {hf_name}")
    if not torch.equal(got["module.decoder.final_layernorm.weight"].float(), hf_sd["model.norm.weight"].float()):
        bad.append("final norm")
    if bad:
        all_ones = all(bool((got[k] == 1).all()) for k in pairs.values())
        hint = " (they are all 1.0: the importer skipped them; apply recipes.cpu_shim)" if all_ones else ""
        raise RuntimeError(f"{nemo_path}: imported norm weights differ from {hf_path}: {', '.join(bad)}{hint}")
    return {"layers": n_layers, "norms_equal": True}

