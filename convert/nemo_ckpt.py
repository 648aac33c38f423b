"""Read and write NeMo 2 checkpoints without building a model: one tensor (or one layer) at a time.

A NeMo 2 checkpoint is a directory with ``context/`` (the serialised model config as
``model.yaml`` and ``io.json``, tokenizer artifacts) and ``weights/`` (a megatron-core dist
checkpoint: torch_dist ``.distcp`` shards + ``.metadata``). Decoder-layer tensors are stored
stacked over layers (``decoder.layers.<name>`` with a leading layer dimension), already gathered
across tensor-parallel ranks. Only tensors are read (torch.distributed.checkpoint); the pickled
``common.pt`` and ``_extra_state`` blobs are never loaded.

The torch_dist format is PyTorch DCP: each ``.distcp`` file is a concatenation of ``torch.save``'d
chunks at byte offsets; the pickled ``.metadata`` (``Metadata``) lists every tensor's global shape and
chunks (``TensorStorageMetadata``/``ChunkStorageMetadata``) and maps each chunk (``MetadataIndex``) to
its file range (``_StorageInfo``); megatron adds ``metadata.json`` (backend names) and ``common.pt``
(non-tensor state). :meth:`NemoCheckpoint.load_layer` reads just the chunks of one layer, and
:class:`DistCheckpointWriter` writes chunks one by one, so neither ever holds a whole model.
"""
from __future__ import annotations

import io
import json
import pickle
import uuid
from functools import cached_property
from pathlib import Path

import torch
import yaml

DISTCP_FILE = "__0_0.distcp"  # megatron names them __<rank>_<thread>.distcp; one writer here
MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}


def dist_checkpoint_keys(weights_dir: str | Path) -> list[str]:
    """Names of everything stored in a dist checkpoint's ``weights/`` dir."""
    from torch.distributed.checkpoint import FileSystemReader
    return list(FileSystemReader(str(weights_dir)).read_metadata().state_dict_metadata)


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

    def _key(self, name: str) -> str:
        if name not in self.tensors:
            raise KeyError(f"{self.weights_dir}: no tensor {name!r}")
        return name if name in self._metadata.state_dict_metadata else f"module.{name}"

    def load(self, name: str) -> torch.Tensor:
        """One tensor, by its name without the ``module.`` prefix."""
        key = self._key(name)
        return read_dist_tensors(self.weights_dir, [key])[key]

    def load_layer(self, name: str, layer: int | None = None) -> torch.Tensor:
        """One layer (index into dim 0) of a stacked tensor, or the whole tensor when ``layer`` is None,
        reading only the chunks that overlap it (any chunking: per layer, per TP rank, gate/up)."""
        key = self._key(name)
        md = self._metadata.state_dict_metadata[key]
        lo, hi = [0] * len(md.size), list(md.size)
        if layer is not None:
            if not 0 <= layer < md.size[0]:
                raise IndexError(f"{self.weights_dir}: {key} has {md.size[0]} layers, no layer {layer}")
            lo[0], hi[0] = layer, layer + 1
        out = torch.empty([h - l for l, h in zip(lo, hi)], dtype=md.properties.dtype)
        covered = 0
        for chunk in md.chunks:
            c_lo = list(chunk.offsets)
            c_hi = [o + s for o, s in zip(chunk.offsets, chunk.sizes)]
            i_lo = [max(a, b) for a, b in zip(lo, c_lo)]
            i_hi = [min(a, b) for a, b in zip(hi, c_hi)]
            if any(a >= b for a, b in zip(i_lo, i_hi)):
                continue
            data = self._read_chunk(key, chunk)
            if i_lo == lo and i_hi == hi and c_lo == lo and [*i_hi] == c_hi:  # one chunk is exactly the region
                return data[0] if layer is not None else data
            src = data[tuple(slice(a - c, b - c) for a, b, c in zip(i_lo, i_hi, c_lo))]
            out[tuple(slice(a - o, b - o) for a, b, o in zip(i_lo, i_hi, lo))].copy_(src)
            covered += src.numel()
            del data, src
        if covered != out.numel():
            raise ValueError(f"{self.weights_dir}: the chunks of {key} cover {covered} of {out.numel()} "
                             f"elements{'' if layer is None else f' of layer {layer}'}")
        return out[0] if layer is not None else out

    def _read_chunk(self, key: str, chunk) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex
        info = self._metadata.storage_data.get(MetadataIndex(key, chunk.offsets))
        if info is None:
            raise ValueError(f"{self.weights_dir}/.metadata: no storage entry for {key} chunk at "
                             f"{tuple(chunk.offsets)}")
        if getattr(info, "transform_descriptors", None):
            raise NotImplementedError(f"{self.weights_dir}: {key} is stored with transforms "
                                      f"{info.transform_descriptors} (compressed DCP); not supported")
        path = self.weights_dir / info.relative_path
        with open(path, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        if len(raw) != info.length:
            raise ValueError(f"{path}: truncated — {key} chunk needs bytes [{info.offset}, "
                             f"{info.offset + info.length}) but the file ends at {info.offset + len(raw)}")
        t = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        del raw
        if tuple(t.shape) != tuple(chunk.sizes):
            raise ValueError(f"{path}: {key} chunk at {tuple(chunk.offsets)} has shape {tuple(t.shape)}, "
                             f"metadata says {tuple(chunk.sizes)}")
        return t

    @cached_property
    def model_yaml(self) -> dict:
        """``context/model.yaml`` as plain YAML (``_target_`` names the NeMo model class)."""
        with open(self.context_dir / "model.yaml", encoding="utf-8") as f:
            return yaml.safe_load(f)

    @cached_property
    def model_config(self) -> dict:
        """The TransformerConfig fields of ``context/model.yaml`` (plain YAML, no objects built)."""
        raw = self.model_yaml
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


class DistCheckpointWriter:
    """Streams tensors into a megatron-core torch_dist checkpoint directory (``weights/``).

    Usage: :meth:`declare` each tensor's global shape and dtype, :meth:`write_chunk` its pieces in any
    order (each ``torch.save``'d at the end of one ``.distcp`` file and dropped by the caller), then
    :meth:`close`, which checks that every declared tensor is covered exactly once and writes
    ``.metadata``, ``metadata.json`` and ``common.pt``. Keys get megatron's ``module.`` prefix.
    Layout as DCP's FileSystemWriter + megatron's MCoreSavePlanner write it (``mcore_data``,
    ``planner_data``), so NeMo restores it like its own importer's output.
    """

    def __init__(self, weights_dir: str | Path, prefix: str = "module."):
        from torch.distributed.checkpoint.metadata import Metadata
        self.dir = Path(weights_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self._file = open(self.dir / DISTCP_FILE, "wb")
        self._md = Metadata(state_dict_metadata={}, planner_data={}, storage_data={})
        self._covered: dict[str, int] = {}
        self.bytes_written = 0

    def declare(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        from torch.distributed.checkpoint.metadata import TensorProperties, TensorStorageMetadata
        key = self.prefix + name
        if key in self._md.state_dict_metadata:
            raise ValueError(f"{self.dir}: tensor {key} declared twice")
        self._md.state_dict_metadata[key] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype), size=torch.Size(shape), chunks=[])
        self._covered[key] = 0

    def write_chunk(self, name: str, offsets: tuple[int, ...], tensor: torch.Tensor) -> None:
        """Write ``tensor`` as the chunk of ``name`` starting at ``offsets`` (same rank as the global shape)."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
        key = self.prefix + name
        md = self._md.state_dict_metadata.get(key)
        if md is None:
            raise KeyError(f"{self.dir}: tensor {key} was not declared")
        if tensor.dtype != md.properties.dtype:
            raise ValueError(f"{key}: chunk dtype {tensor.dtype} != declared {md.properties.dtype}")
        if len(offsets) != len(md.size) or tensor.dim() != len(md.size) or any(
                o < 0 or o + s > g for o, s, g in zip(offsets, tensor.shape, md.size)):
            raise ValueError(f"{key}: chunk {tuple(tensor.shape)} at {tuple(offsets)} does not fit {tuple(md.size)}")
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()  # torch.save writes the whole storage of a view
        offset = self._file.tell()
        torch.save(tensor.detach().cpu(), self._file)
        length = self._file.tell() - offset
        index = MetadataIndex(key, torch.Size(offsets), len(md.chunks))
        md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape))
        self._md.storage_data[index] = self._storage_info(offset, length)
        self._md.planner_data[key] = (key,)
        self._covered[key] += tensor.numel()
        self.bytes_written += length

    def write_object(self, name: str, obj) -> None:
        """A non-tensor entry (megatron ShardedObject: ``torch.save([obj])`` bytes), e.g. ``_extra_state``."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
        key = self.prefix + name
        buf = io.BytesIO()
        torch.save([obj], buf)  # megatron saves the list of a rank's objects with this key
        offset = self._file.tell()
        self._file.write(buf.getbuffer())
        self._md.state_dict_metadata[key] = BytesStorageMetadata()
        self._md.storage_data[MetadataIndex(key)] = self._storage_info(offset, self._file.tell() - offset)
        self._md.planner_data[key] = (key,)

    def _storage_info(self, offset: int, length: int):
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        return _StorageInfo(relative_path=DISTCP_FILE, offset=offset, length=length)

    def close(self, common: dict | None = None) -> Path:
        """Finish: check coverage, write ``.metadata``, ``metadata.json`` and ``common.pt``."""
        from torch.distributed.checkpoint.metadata import StorageMeta
        self._file.close()
        for key, md in self._md.state_dict_metadata.items():
            if key in self._covered and self._covered[key] != md.size.numel():
                raise ValueError(f"{self.dir}: tensor {key} {tuple(md.size)}: chunks cover {self._covered[key]} "
                                 f"of {md.size.numel()} elements")
        self._md.version = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION
        self._md.storage_meta = StorageMeta(checkpoint_id=str(self.dir), save_id=str(uuid.uuid4()))
        self._md.mcore_data = {k: {} for k in self._covered}  # MCoreSavePlanner: no nd-flattened tensors
        with open(self.dir / ".metadata", "wb") as f:
            pickle.dump(self._md, f)
        (self.dir / "metadata.json").write_text(json.dumps(MEGATRON_METADATA), encoding="utf-8")
        torch.save(common if common is not None else default_common_state(), self.dir / "common.pt")
        return self.dir

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._file.closed:
            self._file.close()


def default_common_state() -> dict:
    """``common.pt`` of a fresh import: Lightning's checkpoint dict without tensors (restores read only
    ``state_dict``, which the sharded tensors fill)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        pl_version = version("lightning")
    except PackageNotFoundError:
        pl_version = "unknown"
    return {"epoch": 0, "global_step": 0, "pytorch-lightning_version": pl_version, "state_dict": {},
            "loops": {}, "callbacks": {}, "optimizer_states": {}, "lr_schedulers": []}
