"""Read NeMo 2 checkpoints without building a model: one tensor at a time.

A NeMo 2 checkpoint is a directory with ``context/`` (the serialised model config as
``model.yaml`` and ``io.json``, tokenizer artifacts) and ``weights/`` (a megatron-core dist
checkpoint: torch_dist ``.distcp`` shards + ``.metadata``). Decoder-layer tensors are stored
stacked over layers (``decoder.layers.<name>`` with a leading layer dimension), already gathered
across tensor-parallel ranks. Only tensors are read (torch.distributed.checkpoint); the pickled
``common.pt`` and ``_extra_state`` blobs are never loaded.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch
import yaml


def read_dist_tensors(weights_dir: str | Path, keys: list[str] | None = None) -> dict:
    """Tensors of a NeMo/megatron dist checkpoint (``weights/``), read with torch.distributed.checkpoint
    without a process group. Layer weights are stacked: ``[num_layers, ...]``. All keys when None."""
    from torch.distributed.checkpoint import FileSystemReader, load

    reader = FileSystemReader(str(weights_dir))
    md = reader.read_metadata()
    keys = [k for k, v in md.state_dict_metadata.items() if hasattr(v, "size")] if keys is None else keys
    missing = [k for k in keys if k not in md.state_dict_metadata]
    if missing:
        raise KeyError(f"{weights_dir}: no tensor(s) {missing}")
    sd = {k: torch.empty(md.state_dict_metadata[k].size, dtype=md.state_dict_metadata[k].properties.dtype)
          for k in keys}
    load(sd, storage_reader=reader, no_dist=True)
    return sd


class NemoCheckpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.weights_dir = self.path / "weights"
        self.context_dir = self.path / "context"
        for p in (self.weights_dir / ".metadata", self.context_dir / "model.yaml"):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing — {self.path} is not a NeMo 2 checkpoint directory")

    @cached_property
    def _metadata(self):
        from torch.distributed.checkpoint import FileSystemReader
        return FileSystemReader(str(self.weights_dir)).read_metadata()

    @cached_property
    def tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of every model tensor (no optimizer state, no extra state)."""
        out = {}
        for k, md in self._metadata.state_dict_metadata.items():
            if k.startswith("optimizer.") or "_extra_state" in k or not hasattr(md, "size"):
                continue
            out[k.removeprefix("module.")] = (tuple(md.size), md.properties.dtype)
        return out

    def load(self, name: str) -> torch.Tensor:
        """One tensor, by its name without the ``module.`` prefix."""
        if name not in self.tensors:
            raise KeyError(f"{self.weights_dir}: no tensor {name!r}")
        key = name if name in self._metadata.state_dict_metadata else f"module.{name}"
        return read_dist_tensors(self.weights_dir, [key])[key]

    @cached_property
    def model_config(self) -> dict:
        """The TransformerConfig fields of ``context/model.yaml`` (plain YAML, no objects built)."""
        with open(self.context_dir / "model.yaml", encoding="utf-8") as f:
            raw = yaml.safe_load(f)
        return raw.get("config", raw)

    @cached_property
    def adapter_metadata(self) -> dict | None:
        p = self.weights_dir / "adapter_metadata.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

    def lora_settings(self) -> dict:
        """dim/alpha/dropout/target_modules of the LoRA transform saved in the checkpoint's context."""
        from nemo.lightning import io
        lora = io.load_context(self.context_dir, subpath="model.model_transform")
        if lora is None or not hasattr(lora, "dim"):
            raise ValueError(f"{self.context_dir}: no LoRA transform in the checkpoint context")
        alpha = lora.alpha if lora.alpha is not None else lora.dim
        return {"dim": int(lora.dim), "alpha": alpha, "dropout": float(lora.dropout),
                "target_modules": list(lora.target_modules)}

    def attention_shape(self) -> dict:
        c = self.model_config
        n, g = int(c["num_attention_heads"]), int(c.get("num_query_groups") or c["num_attention_heads"])
        d = int(c.get("kv_channels") or c["hidden_size"] // n)
        return {"n_heads": n, "n_groups": g, "head_dim": d, "num_layers": int(c["num_layers"])}
