"""Hugging Face Llama/Qwen2 (safetensors) -> NeMo 2 checkpoint directory, streaming, one layer at a time.

    python -m convert.hf_to_nemo --hf HF_DIR --output NEMO_DIR [--overwrite]

The output is what NeMo 2.1's importer (``llm.import_ckpt``) writes and what NeMo restores from
(``recipes.nemo_backend.load_nemo_model``, ``llm.finetune`` with a RestoreConfig):

* ``context/`` — ``io.json``, ``model.yaml`` and ``nemo_tokenizer/``, dumped by NeMo's own io machinery
  from ``LlamaModel``/``Qwen2Model(config, tokenizer=AutoTokenizer(...))``; the model is never
  configured, so no weights exist in memory;
* ``weights/`` — a megatron torch_dist checkpoint (``module.`` keys, decoder tensors stacked over
  layers with one chunk per layer, fc1 as gate/up chunks, ``_extra_state`` entries) written chunk by
  chunk with :class:`convert.nemo_ckpt.DistCheckpointWriter`;
* ``conversion.json`` — source, family, tensor count, bytes, seconds.

Tensors keep their dtype and values bit for bit (the row table is the family's, :mod:`families`). HF
tensors are taken straight from the safetensors files (:class:`SafetensorsReader`): decoder tensors
as one small copy-on-write mapping each, dropped once written, so ``torch.save`` writes them from
the page cache with one copy (safetensors' own ``safe_open`` maps whole shards, and touched pages
count in RSS), the rest with ``readinto``; peak memory is one layer's tensors above the interpreter. Everything is checked before the
first byte is written: every tensor present, in range of its file, with the shape the config
implies. The output is built in a temp dir beside the target and renamed at the end
(:func:`recipes.fileio.atomic_dir`): a killed run leaves no output that looks complete.
"""
from __future__ import annotations

import os

# Conversion never downloads; set before transformers/huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import families
from convert import run_json_command
from families.spec import AttentionShape, ModelFamily, ParamMapping, UnsupportedModelError, dtype_kwargs
from convert.nemo_ckpt import DistCheckpointWriter, mapped_bytes
from recipes.fileio import atomic_dir, keep_freed_memory

CONVERSION_INFO = "conversion.json"
TOKENIZER_ARTIFACT = "nemo_tokenizer"  # the name NeMo's importer gives context/<tokenizer dir>
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class ConversionError(ValueError):
    """Bad input: the message names the file and tensor or field."""


# ---------------------------------------------------------------------------------------------
# safetensors, read one tensor at a time


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: str | Path) -> dict[str, TensorEntry]:
    """Tensor name -> entry of one ``.safetensors`` file; checks that every tensor lies inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise ConversionError(f"{path}: corrupt or truncated safetensors header (header length {n}, "
                                  f"file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start, data_size = 8 + n, size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: tensor {name!r}: bad header entry {info!r}") from None
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if end - begin != nbytes:
            raise ConversionError(f"{path}: tensor {name!r}: data_offsets {begin}..{end} hold {end - begin} bytes, "
                                  f"shape {list(shape)} {info['dtype']} needs {nbytes}")
        if end > data_size:
            raise ConversionError(f"{path}: truncated — tensor {name!r} needs data bytes {begin}..{end} but the "
                                  f"file has only {data_size}")
        out[name] = TensorEntry(path, dtype, shape, data_start + begin, nbytes)
    return out


class SafetensorsReader:
    """All tensors of a HF model dir (``model.safetensors`` or the shards of
    ``model.safetensors.index.json``), read one at a time: into fresh memory (:meth:`get`), or mapped
    from the page cache (:meth:`mapped`: one private mapping per tensor, unmapped when its last view
    is dropped, so the RSS holds only the tensors in use)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.dir}: no *.safetensors weights (only safetensors checkpoints are read)")
        self.entries: dict[str, TensorEntry] = {}
        for name in files:
            p = self.dir / name
            if not p.is_file():
                raise ConversionError(f"{index}: shard {name} does not exist")
            for k, e in read_safetensors_header(p).items():
                if k in self.entries:
                    raise ConversionError(f"{self.dir}: tensor {k!r} is in both {self.entries[k].file.name} and {name}")
                self.entries[k] = e
        if weight_map is not None:
            for k, fname in weight_map.items():
                if k not in self.entries or self.entries[k].file.name != fname:
                    raise ConversionError(f"{index}: tensor {k!r} is mapped to {fname} but is not in that file")

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read into fresh memory."""
        e = self.entries.get(name)
        if e is None:
            raise ConversionError(f"{self.dir}: missing tensor {name!r}")
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        with open(e.file, "rb", buffering=0) as f:
            f.seek(e.start)
            got = f.readinto(memoryview(buf.numpy()))
        if got != e.nbytes:
            raise ConversionError(f"{e.file}: truncated — tensor {name!r} has {got} of {e.nbytes} bytes")
        return buf.view(e.dtype).reshape(e.shape)

    def mapped(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a view of its own copy-on-write mapping of its file's bytes: written
        out, its bytes go from the page cache to the output with one copy (measured here, 1 GB into a
        new file: 1.1 GB/s from a mapping, 0.4-0.5 GB/s through a reused 64 MiB read buffer)."""
        e = self.entries.get(name)
        if e is None:
            raise ConversionError(f"{self.dir}: missing tensor {name!r}")
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        with open(e.file, "rb") as f:
            if os.fstat(f.fileno()).st_size < e.start + e.nbytes:
                raise ConversionError(f"{e.file}: truncated — tensor {name!r} needs bytes up to {e.start + e.nbytes}")
            return mapped_bytes(f, e.start, e.nbytes).view(e.dtype).reshape(e.shape)


# ---------------------------------------------------------------------------------------------
# plan: what is written, checked before anything is


def read_hf_config(hf_dir: str | Path) -> dict:
    p = Path(hf_dir) / "config.json"
    if not p.is_file():
        raise ConversionError(f"{p}: not found ({hf_dir} is not a Hugging Face model directory)")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{p}: not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{p}: not a JSON object")
    return cfg


@dataclass
class Plan:
    """What one conversion reads and writes."""

    hf: dict
    family: ModelFamily
    attn: AttentionShape
    rows: list[ParamMapping]
    num_layers: int
    embedding_rows: int  # rows NeMo builds (>= HF vocab: megatron padding, zero-filled)
    layer_shapes: dict[str, tuple[int, ...]]  # dist key -> one layer's (or the whole) Megatron shape
    dtypes: dict[str, torch.dtype]
    layer_bytes: int  # HF bytes of one decoder layer


def make_plan(hf_dir: str | Path, reader: SafetensorsReader, tokenizer_len: int) -> Plan:
    """Check every HF tensor the conversion needs (present, shape the config implies, one dtype per
    row) and size the Megatron tensors. Raises ConversionError naming the tensor and file."""
    cfg_path = Path(hf_dir) / "config.json"
    hf = read_hf_config(hf_dir)
    fam = families.for_hf(hf, cfg_path)
    fam.nemo_config(hf, cfg_path)  # validates the config
    attn = AttentionShape.from_hf(hf)
    tied = bool(hf.get("tie_word_embeddings", False))
    n_layers, vocab = int(hf["num_hidden_layers"]), int(hf["vocab_size"])
    expected = fam.expected_hf_shapes(hf)  # HF name pattern -> shape implied by config.json
    rows = fam.rows_for(tied)
    used, layer_shapes, dtypes, layer_bytes = set(), {}, {}, 0
    for row in rows:
        for layer in range(n_layers) if row.per_layer else [None]:
            names = row.hf_names(layer)
            shapes = []
            for pattern, name in zip(row.hf, names):
                e = reader.entries.get(name)
                if e is None:
                    raise ConversionError(f"{hf_dir}: missing tensor {name!r} (needed for {row.megatron})")
                if e.shape != expected[pattern]:
                    raise ConversionError(f"{e.file}: tensor {name!r} has shape {list(e.shape)}, config.json "
                                          f"implies {list(expected[pattern])}")
                if dtypes.setdefault(row.dist_key, e.dtype) != e.dtype:
                    raise ConversionError(f"{e.file}: tensor {name!r} is {e.dtype}, other tensors of "
                                          f"{row.megatron} are {dtypes[row.dist_key]}")
                shapes.append(e.shape)
                used.add(name)
                if layer == 0:
                    layer_bytes += e.nbytes
            layer_shapes[row.dist_key] = row.megatron_shape(shapes)
    unused = [k for k in reader.entries if k not in used and not k.endswith(fam.ignored_hf)
              and not (tied and k == "lm_head.weight")]
    if unused:
        raise ConversionError(f"{hf_dir}: tensor(s) not covered by the {fam.name} mapping: {sorted(unused)[:8]}")
    emb_rows = fam.nemo_embedding_rows(hf, tokenizer_len)
    if emb_rows < vocab:
        raise ConversionError(f"{cfg_path}: vocab_size {vocab} but the tokenizer has {tokenizer_len} tokens; NeMo "
                              f"2.1's {fam.nemo_model} would size the embedding to {emb_rows} rows")
    return Plan(hf, fam, attn, rows, n_layers, emb_rows, layer_shapes, dtypes, layer_bytes)


# ---------------------------------------------------------------------------------------------
# weights


def write_weights(plan: Plan, reader: SafetensorsReader, weights_dir: Path, progress: bool = True) -> dict:
    """Stream every tensor into ``weights_dir``; returns {"tensors": n, "bytes": b}.

    Decoder-layer tensors are mapped (:meth:`SafetensorsReader.mapped`), one mapping row at a time
    (q/k/v, gate/up, ...), so torch.save writes them from the page cache and at most one row's
    mappings and its fused copy are held."""
    from tqdm import tqdm

    w = DistCheckpointWriter(weights_dir)
    n_tensors = 0
    global_rows = [r for r in plan.rows if not r.per_layer]
    layer_rows = [r for r in plan.rows if r.per_layer]
    for row in plan.rows:
        shape = plan.layer_shapes[row.dist_key]
        if row.hf[0] in ("model.embed_tokens.weight", "lm_head.weight"):
            shape = (plan.embedding_rows, *shape[1:])
        w.declare(row.dist_key, (plan.num_layers, *shape) if row.per_layer else shape, plan.dtypes[row.dist_key])
    for row in global_rows:
        tensors = [reader.get(n) for n in row.hf_names()]
        for off, chunk in row.to_megatron(tensors, plan.attn):
            w.write_chunk(row.dist_key, (off, *[0] * (chunk.dim() - 1)), chunk)
        t = tensors[0]
        if row.hf[0] in ("model.embed_tokens.weight", "lm_head.weight") and plan.embedding_rows > t.shape[0]:
            # megatron's vocab padding: rows no token id reaches, zero as in a fresh NeMo model's pad
            w.write_chunk(row.dist_key, (t.shape[0], 0), torch.zeros(plan.embedding_rows - t.shape[0],
                                                                        *t.shape[1:], dtype=t.dtype))
        n_tensors += len(tensors)
        del tensors, t

    for layer in tqdm(range(plan.num_layers), desc="layers", unit="layer", disable=not progress):
        for row in layer_rows:
            tensors = [reader.mapped(n) for n in row.hf_names(layer)]
            for off, chunk in row.to_megatron(tensors, plan.attn):
                w.write_chunk(row.dist_key, (layer, off, *[0] * (chunk.dim() - 1)), chunk.unsqueeze(0))
            n_tensors += len(tensors)
            del tensors  # the last views: unmapped
        for module in plan.family.extra_state:
            w.write_object(f"decoder.layers.{module}._extra_state/shard_{layer}_{plan.num_layers}", None)
    w.close()
    return {"tensors": n_tensors, "bytes": w.bytes_written}


# ---------------------------------------------------------------------------------------------
# context (NeMo's own io dump of an unconfigured model)


@contextlib.contextmanager
def _config_checks_without_fused_kernels():
    """On a machine without CUDA, megatron's TransformerConfig.__post_init__ rejects the fused-kernel
    defaults ("apply_rope_fusion is not available. Please install TE >= 1.4 or Apex."). The context
    records the constructor arguments (defaults kept, as NeMo's importer writes them), so the check is
    bypassed only while the config object is built, then restored."""
    if torch.cuda.is_available():
        yield
        return
    from megatron.core.transformer.transformer_config import TransformerConfig

    from recipes.cpu_shim import post_init_without_fusions

    original = TransformerConfig.__post_init__
    TransformerConfig.__post_init__ = post_init_without_fusions(original)
    try:
        yield
    finally:
        TransformerConfig.__post_init__ = original


def _wrap_io_init_of_subclass(cls) -> type:
    """NeMo 2.1's IOMixin records constructor arguments (``__io__``) by wrapping ``__init__`` on first
    instantiation and marking the class with ``__wrapped_init__`` — an attribute subclasses inherit.
    Once LlamaConfig has been instantiated in a process, Llama31Config's own ``__init__`` is never
    wrapped, the config has no ``__io__`` and io_dump fails with "Error occurred while importing pyref
    to 'init_method_normal.<locals>.init_'". Clearing the inherited mark lets NeMo wrap the subclass."""
    if "__wrapped_init__" not in cls.__dict__ and getattr(cls, "__wrapped_init__", False):
        cls.__wrapped_init__ = False
    return cls


def nemo_model(hf: dict, tokenizer_dir: Path):
    """The NeMo LightningModule (unconfigured: no weights) for this HF config and tokenizer dir."""
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    fam = families.for_hf(hf)
    cls_name, kw = fam.nemo_config(hf)
    with _config_checks_without_fused_kernels():
        config = _wrap_io_init_of_subclass(fam.nemo_class(cls_name))(**kw, **dtype_kwargs(hf))
    model_cls = _wrap_io_init_of_subclass(fam.nemo_class())
    return model_cls(config, tokenizer=AutoTokenizer(str(tokenizer_dir)))


def write_context(hf: dict, tokenizer_dir: Path, context_dir: Path) -> None:
    """``context/`` as ModelConnector.nemo_save dumps it: TrainerContext(model, trainer).io_dump."""
    from nemo import lightning as nl
    from nemo.lightning.io.pl import TrainerContext

    model = nemo_model(hf, tokenizer_dir)
    trainer = nl.Trainer(devices=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         strategy=nl.MegatronStrategy(ddp="pytorch", setup_optimizers=False))
    trainer.strategy.connect(model)
    TrainerContext.from_trainer(trainer).io_dump(context_dir, yaml_attrs=["model"])


def import_dependencies() -> None:
    """Import everything a conversion uses (the memory benchmark measures RSS after this)."""
    import nemo.collections.llm  # noqa: F401
    import nemo.lightning  # noqa: F401
    import tqdm  # noqa: F401
    import transformers  # noqa: F401


# ---------------------------------------------------------------------------------------------
# the conversion


def convert(hf_dir: str | Path, output: str | Path, overwrite: bool = False, progress: bool = True) -> dict:
    """HF model dir -> NeMo 2 checkpoint dir; returns the conversion report (also ``conversion.json``)."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    hf_dir = Path(hf_dir).absolute()
    hf = read_hf_config(hf_dir)
    families.for_hf(hf, hf_dir / "config.json")  # unknown architecture: fail before anything else
    reader = SafetensorsReader(hf_dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{hf_dir}: cannot load the tokenizer ({e})") from None
    plan = make_plan(hf_dir, reader, len(tok))
    with atomic_dir(output, overwrite, inputs=(hf_dir,)) as tmp, \
            tempfile.TemporaryDirectory(prefix=".hf_to_nemo-tok-", dir=tmp.parent) as tok_tmp:
        # NeMo's AutoTokenizer artifact copies its whole directory into context/, so it points at a
        # tokenizer-only copy, named as the importer names it.
        tok_dir = Path(tok_tmp) / TOKENIZER_ARTIFACT
        tok.save_pretrained(tok_dir)
        write_context(hf, tok_dir, tmp / "context")
        stats = write_weights(plan, reader, tmp / "weights", progress)
        report = {"source": str(hf_dir), "family": plan.family.name, "num_layers": plan.num_layers,
                  "embedding_rows": plan.embedding_rows, "vocab_size": int(hf["vocab_size"]), **stats,
                  "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / CONVERSION_INFO).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return {"output": str(Path(output).absolute()), **report}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.hf_to_nemo", description=__doc__.split("\n\n")[0],
                                 epilog="Families: " + ", ".join(f"{f.name} ({', '.join(f.architectures)})"
                                                                 for f in families.all_families()))
    ap.add_argument("--hf", required=True, help="Hugging Face model dir (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--output", required=True, help="NeMo 2 checkpoint dir to create (context/ + weights/)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    def call():
        keep_freed_memory()
        import_dependencies()
        return convert(args.hf, args.output, overwrite=args.overwrite, progress=not args.no_progress)

    return run_json_command(call, (ConversionError, UnsupportedModelError, FileExistsError,
                                   FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
