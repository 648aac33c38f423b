"""Model families: one file each (``families/llama.py``, ``qwen2.py``, ``mistral.py``), and this registry.

Everything outside this package asks the registry; no family name appears in code elsewhere::

    from families import for_hf, get
    fam = for_hf(json.load(open("config.json")))   # by ``architectures``, else ``model_type``
    fam.nemo_config(hf)                             # (NeMo config class, kwargs)
    fam.rows_for(tied=False)                        # HF <-> Megatron weight rows
    fam.lora_modules()["linear_qkv"].hf_modules     # ('q_proj', 'k_proj', 'v_proj')

Adding a family: copy ``families/mistral.py`` (the smallest one), change what differs, and add its
module to :data:`FAMILY_MODULES` (docs/architecture.md, "Adding a model family").
"""
from __future__ import annotations

import importlib
from pathlib import Path

from families.spec import AttentionShape, DecoderShape, ModelFamily, UnsupportedModelError

__all__ = ["AttentionShape", "DecoderShape", "ModelFamily", "UnsupportedModelError", "DEFAULT_FAMILY",
           "all_families", "for_hf", "for_nemo", "get", "names", "register"]

# The family modules, imported (and so registered) on first use of the registry.
FAMILY_MODULES = ("families.llama", "families.qwen2", "families.mistral")
# ExperimentConfig.model.family when a config does not name one
DEFAULT_FAMILY = "llama"

_REGISTRY: dict[str, ModelFamily] = {}
_loaded = False


def register(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: register one instance of a family under ``cls.name``."""
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"family {cls.name!r} is registered twice")
    clash = {a for f in _REGISTRY.values() if f.name != cls.name for a in f.architectures} & set(cls.architectures)
    if clash:
        raise ValueError(f"family {cls.name!r}: architectures {sorted(clash)} already belong to another family")
    _REGISTRY[cls.name] = cls()
    return cls


def _load() -> dict[str, ModelFamily]:
    global _loaded
    if not _loaded:
        for m in FAMILY_MODULES:
            importlib.import_module(m)
        _loaded = True
    return _REGISTRY


def names() -> list[str]:
    """Registered family names, in registration order."""
    return list(_load())


def all_families() -> list[ModelFamily]:
    return list(_load().values())


def get(name: str) -> ModelFamily:
    """The family called ``name``; ValueError naming the known ones otherwise."""
    fams = _load()
    if name not in fams:
        raise UnsupportedModelError(f"model family {name!r} is not supported; known: {', '.join(fams)}")
    return fams[name]


def for_hf(hf: dict, path: str | Path = "config.json") -> ModelFamily:
    """The family of a HF config.json dict (by ``architectures``, else ``model_type``)."""
    archs = hf.get("architectures") or []
    for fam in _load().values():
        if any(a in fam.architectures for a in archs) or (not archs and hf.get("model_type") == fam.model_type):
            return fam
    known = sorted(a for f in _REGISTRY.values() for a in f.architectures)
    raise UnsupportedModelError(f"{path}: architectures {archs!r} (model_type {hf.get('model_type')!r}) is not "
                                f"supported; known: {known}")


def for_nemo(model_yaml: dict, path: str | Path = "context/model.yaml") -> ModelFamily:
    """The family of a NeMo checkpoint from the ``_target_`` of its ``context/model.yaml``."""
    target = str(model_yaml.get("_target_", ""))
    for fam in _load().values():
        if target == fam.nemo_target:
            return fam
    raise UnsupportedModelError(f"{path}: model {target!r} is not supported; known: "
                                f"{sorted(f.nemo_target for f in _REGISTRY.values())}")
