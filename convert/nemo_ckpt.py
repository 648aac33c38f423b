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

Speed: a chunk is read by ``torch.load`` straight from its byte range of the ``.distcp`` file
(:class:`FileRange`, the way DCP's own FileSystemReader reads, so the bytes are copied once, into
the tensor), or mapped (:func:`mapped_record`), or located for a file-to-file copy
(:meth:`NemoCheckpoint.rows_location`), both after a data-free ``torch.load(map_location="meta")``
check of the record (:func:`record_data`). Chunks are written by ``torch.save`` without record
CRC32s (:func:`records_without_crc32`): miniz's byte-at-a-time CRC is 85 % of a write (0.48 GB/s
with it, 3.15 GB/s without, measured on 67 MB tensors), and torch.load never checks it (PyTorch
builds miniz with ``MINIZ_DISABLE_ZIP_READER_CRC32_CHECKS``; torch 1.9's build log already lists it).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import uuid
from functools import cached_property
from pathlib import Path

import torch
import yaml

from recipes.fileio import PieceWriter

DISTCP_FILE = "__0_0.distcp"  # megatron names them __<rank>_<thread>.distcp; one writer here
MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}


@contextlib.contextmanager
def records_without_crc32():
    """``torch.save`` inside writes each zip record's CRC32 as 0 (``torch.serialization.set_crc32_options``,
    torch >= 2.6; older torch computes it as before). The previous setting is restored."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None:
        yield
        return
    before = get()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


class FileRange(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open binary file as a seekable read-only stream, so
    ``torch.load`` reads one DCP chunk in place (``readinto`` straight into the tensor's memory)."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self._f, self._start, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def readinto(self, b) -> int:
        n = min(len(b), self._len - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got
        return got


def record_data(f, offset: int, length: int) -> tuple[int, torch.Tensor] | None:
    """Where the data of the tensor ``torch.save``'d at bytes ``[offset, offset + length)`` of the
    open file ``f`` starts, with the tensor on the meta device (shape, dtype), or None when the record
    is not one plain tensor (then read it with ``torch.load``). Checked: ``torch.load(map_location=
    "meta")`` unpickles the record without its data (shape, dtype, strides, storage size), and the
    zip entry of its one storage is stored uncompressed, little endian, exactly the tensor's bytes."""
    import struct
    import zipfile

    try:
        meta = torch.load(FileRange(f, offset, length), map_location="meta", weights_only=True)
        if not isinstance(meta, torch.Tensor) or not meta.is_contiguous() or meta.storage_offset() != 0:
            return None
        nbytes = meta.numel() * meta.element_size()
        if meta.untyped_storage().nbytes() != nbytes or nbytes == 0:
            return None
        with zipfile.ZipFile(FileRange(f, offset, length)) as z:
            infos = z.infolist()
        data = [i for i in infos if i.filename.rsplit("/", 2)[-2:-1] == ["data"]]
        order = [i for i in infos if i.filename.endswith("/byteorder")]
        if len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED or data[0].file_size != nbytes:
            return None

        def entry_start(info) -> int | None:  # past the local header (zipfile would check the CRC)
            f.seek(offset + info.header_offset)
            head = f.read(30)
            if len(head) != 30 or head[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            return offset + info.header_offset + 30 + name_len + extra_len

        if order:
            at = entry_start(order[0])
            f.seek(at if at is not None else offset + length)
            if order[0].compress_type != zipfile.ZIP_STORED or f.read(order[0].file_size).strip() != b"little":
                return None
        start = entry_start(data[0])
        if start is None or start + nbytes > offset + length:
            return None
    except (RuntimeError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError):
        return None
    return start, meta


def mapped_bytes(f, start: int, nbytes: int) -> torch.Tensor:
    """Bytes ``[start, start + nbytes)`` of the open file ``f`` as a uint8 tensor viewing its own
    copy-on-write mapping (unmapped when the last view is dropped; writes never reach the file)."""
    import mmap

    base = start - start % mmap.ALLOCATIONGRANULARITY
    m = mmap.mmap(f.fileno(), start + nbytes - base, offset=base, access=mmap.ACCESS_COPY)
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=start - base)


def mapped_record(f, offset: int, length: int) -> torch.Tensor | None:
    """The tensor ``torch.save``'d at bytes ``[offset, offset + length)`` of the open file ``f`` as a
    view of a copy-on-write mapping of its data bytes (checked by :func:`record_data`), or None.
    Written out, a mapped tensor's bytes go from the page cache to the output file with one copy."""
    found = record_data(f, offset, length)
    if found is None:
        return None
    start, meta = found
    return mapped_bytes(f, start, meta.numel() * meta.element_size()).view(meta.dtype).reshape(meta.shape)


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

    def load_layer(self, name: str, layer: int | None = None, mapped: bool = False) -> torch.Tensor:
        """One layer (index into dim 0) of a stacked tensor, or the whole tensor when ``layer`` is None,
        reading only the chunks that overlap it (any chunking: per layer, per TP rank, gate/up).
        With ``mapped`` a chunk that is exactly the region comes back as a copy-on-write mapping of
        its bytes in the ``.distcp`` file (:func:`mapped_record`) instead of a read."""
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
            data = self._read_chunk(key, chunk, mapped=mapped)
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

    def rows_location(self, name: str, layer: int | None, lo: int, hi: int) -> tuple[Path, int] | None:
        """``(file, offset)`` of rows ``[lo, hi)`` of one layer (of the tensor when ``layer`` is None),
        when one plain chunk record (:func:`record_data`) holds them whole, so their bytes are one
        contiguous range that can be copied file to file; else None."""
        from torch.distributed.checkpoint.metadata import MetadataIndex
        key = self._key(name)
        md = self._metadata.state_dict_metadata[key]
        want_lo = ([layer] if layer is not None else []) + [lo]
        want_hi = ([layer + 1] if layer is not None else []) + [hi]
        d = len(want_lo)  # the dims before the rows' own (full) dims
        for chunk in md.chunks:
            c_lo, c_sz = list(chunk.offsets), list(chunk.sizes)
            if not all(c_lo[i] <= want_lo[i] and want_hi[i] <= c_lo[i] + c_sz[i] for i in range(d)):
                continue
            if any(c_lo[d:]) or c_sz[d:] != list(md.size[d:]):
                return None  # split along a later dim (a TP-sharded checkpoint): not one byte range
            info = self._metadata.storage_data.get(MetadataIndex(key, chunk.offsets))
            if info is None or getattr(info, "transform_descriptors", None):
                return None
            path = self.weights_dir / info.relative_path
            with open(path, "rb", buffering=0) as f:
                if info.offset + info.length > os.fstat(f.fileno()).st_size:
                    return None
                found = record_data(f, info.offset, info.length)
            if found is None or list(found[1].shape) != c_sz:
                return None
            start, meta = found
            row_bytes = meta.element_size()
            for n in c_sz[d:]:
                row_bytes *= n
            first = (want_lo[0] - c_lo[0]) * c_sz[1] + (lo - c_lo[1]) if d == 2 else lo - c_lo[0]
            return path, start + first * row_bytes
        return None

    def _read_chunk(self, key: str, chunk, mapped: bool = False) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex
        info = self._metadata.storage_data.get(MetadataIndex(key, chunk.offsets))
        if info is None:
            raise ValueError(f"{self.weights_dir}/.metadata: no storage entry for {key} chunk at "
                             f"{tuple(chunk.offsets)}")
        if getattr(info, "transform_descriptors", None):
            raise NotImplementedError(f"{self.weights_dir}: {key} is stored with transforms "
                                      f"{info.transform_descriptors} (compressed DCP); not supported")
        path = self.weights_dir / info.relative_path
        with open(path, "rb", buffering=0) as f:
            end = os.fstat(f.fileno()).st_size
            if info.offset + info.length > end:
                raise ValueError(f"{path}: truncated — {key} chunk needs bytes [{info.offset}, "
                                 f"{info.offset + info.length}) but the file ends at {end}")
            t = mapped_record(f, info.offset, info.length) if mapped else None
            if t is None:
                t = torch.load(FileRange(f, info.offset, info.length), map_location="cpu", weights_only=True)
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
        self._file = PieceWriter(self.dir / DISTCP_FILE)
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
        with records_without_crc32():
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
