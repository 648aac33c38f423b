"""NeMo 2 checkpoint (full model) -> Hugging Face Llama/Qwen2 directory, streaming, one layer at a time.

    python -m convert.nemo_to_hf --nemo NEMO_DIR --output HF_DIR [--base-hf BASE_HF_DIR] \\
        [--max-shard-size 2GB] [--overwrite] [--no-prefetch]

Writes ``config.json``, safetensors shards (``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` +
``model.safetensors.index.json`` when there are several, as transformers names them),
``generation_config.json`` and the tokenizer files (chat template included). It fixes what NeMo
2.1's own exporter gets wrong (shared/reference/nemo-2.1.md): the vocab is the TRUE one (megatron's
padding rows are cut off; ``--base-hf``'s vocab_size, Qwen2's recorded vocab_size, else the
tokenizer length — 128256 for Llama 3.1, never the tokenizer's 128000 base vocab), ``rope_scaling``
comes from the Llama 3.1 config fields, and ``max_position_embeddings``/bos/eos/pad ids come from
``--base-hf`` (else the NeMo seq_length and the tokenizer). Tokenizer files and
generation_config.json are copied from ``--base-hf``, else taken from the checkpoint's
``context/nemo_tokenizer``.

Streaming: the shard layout is planned from the checkpoint metadata first (names, shapes, dtypes
are known without reading data), each shard's safetensors header is written when it is opened, and
tensors are appended one layer at a time, so memory stays at about one layer. A tensor whose rows
lie whole in one DCP chunk record (all but q/k/v, whose heads are interleaved) is copied file to
file inside the kernel (``copy_file_range``, :meth:`convert.nemo_ckpt.NemoCheckpoint.rows_location`);
q/k/v are mapped (:meth:`~convert.nemo_ckpt.NemoCheckpoint.load_layer` with ``mapped=True``), split
and written, the next one on a thread while the current one is written (``--no-prefetch``: not). Tensors keep their dtype and values bit for bit.
The output is built in a temp dir and renamed at the end (:func:`recipes.fileio.atomic_dir`).
LoRA checkpoints (adapters only) are refused: see ``convert.lora_to_peft`` / ``convert.merge``.
"""
from __future__ import annotations

import os

# Conversion never downloads; set before transformers/huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import concurrent.futures
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import families
from convert import run_json_command
from families.spec import CONFIG_FIELDS, AttentionShape, ModelFamily, UnsupportedModelError
from convert.merge import TOKENIZER_FILES
from convert.nemo_ckpt import NemoCheckpoint
from recipes.fileio import PieceWriter, atomic_dir, keep_freed_memory

SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
PADDED_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")  # megatron pads their vocab rows
INDEX_FILE = "model.safetensors.index.json"


class ExportError(ValueError):
    """The checkpoint cannot be exported (the message names the file, tensor or field)."""


def parse_size(text: str | int) -> int:
    """'2GB' / '500MB' / '1.5GiB' / 12345 -> bytes (decimal units as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: expected e.g. 2GB, 500MB or a byte count")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


# ---------------------------------------------------------------------------------------------
# plan


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def tokenizer_dir(ckpt: NemoCheckpoint) -> Path:
    """The HF tokenizer saved in the checkpoint's context (``model.yaml`` tokenizer.pretrained_model_name)."""
    tok = ckpt.model_yaml.get("tokenizer") or {}
    name = tok.get("pretrained_model_name")
    for p in ((ckpt.context_dir / name) if name else None, ckpt.context_dir / "nemo_tokenizer"):
        if p is not None and (p / "tokenizer_config.json").is_file():
            return p
    raise ExportError(f"{ckpt.context_dir}: no HF tokenizer in the context (model.yaml tokenizer "
                      f"{name!r}); pass --base-hf")


def true_vocab(ckpt: NemoCheckpoint, cfg: dict, base: dict | None, tok_len: int) -> int:
    """The HF vocab_size: --base-hf's, else the one NeMo's Qwen2Config records, else the tokenizer length."""
    if base is not None and base.get("vocab_size"):
        return int(base["vocab_size"])
    if cfg.get("vocab_size"):
        return int(cfg["vocab_size"])
    return tok_len


def plan_tensors(ckpt: NemoCheckpoint, fam: ModelFamily, cfg: dict, vocab: int) -> list[tuple]:
    """``(row, layer, [OutTensor...])`` in write order, from the checkpoint metadata alone. Raises
    ExportError naming the missing or mis-shaped tensor."""
    attn = AttentionShape.from_nemo(cfg)
    n_layers = int(cfg["num_layers"])
    tied = bool(cfg.get("share_embeddings_and_output_weights"))
    rows = fam.rows_for(tied)
    out = []
    for row in rows:
        if row.dist_key not in ckpt.tensors:
            raise ExportError(f"{ckpt.weights_dir}: missing tensor {row.dist_key!r} (for {', '.join(row.hf)})")
        shape, dtype = ckpt.tensors[row.dist_key]
        if dtype not in SAFETENSORS_NAMES:
            raise ExportError(f"{ckpt.weights_dir}: tensor {row.dist_key!r} is {dtype}; expected one of "
                              f"{sorted(map(str, SAFETENSORS_NAMES))}")
        if row.per_layer:
            if shape[0] != n_layers:
                raise ExportError(f"{ckpt.weights_dir}: tensor {row.dist_key!r} has {shape[0]} layers, model.yaml "
                                  f"num_layers is {n_layers}")
            shape = shape[1:]
        if row.dist_key in PADDED_ROWS:
            if shape[0] < vocab:
                raise ExportError(f"{ckpt.weights_dir}: {row.dist_key} has {shape[0]} rows, fewer than the "
                                  f"vocab size {vocab}")
            shape = (vocab, *shape[1:])
        hf_shapes = row.hf_shapes(shape, attn)
        if row.megatron_shape(hf_shapes) != tuple(shape):
            raise ExportError(f"{ckpt.weights_dir}: tensor {row.dist_key!r} has shape {list(shape)}, which does "
                              f"not fit heads={attn.n_heads} groups={attn.n_groups} head_dim={attn.head_dim}")
        for layer in range(n_layers) if row.per_layer else [None]:
            out.append((row, layer, [OutTensor(n, s, dtype) for n, s in zip(row.hf_names(layer), hf_shapes)]))
    # HF order: embeddings, then layer by layer, then the final norm and lm_head
    order = {"embedding.word_embeddings.weight": -1, "decoder.final_layernorm.weight": 1, "output_layer.weight": 2}
    out.sort(key=lambda x: (order.get(x[0].dist_key, 0), x[1] if x[1] is not None else 0))
    return out


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """transformers' rule: fill a shard in order; start a new one when the next tensor would overflow it."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


# ---------------------------------------------------------------------------------------------
# safetensors, written one tensor at a time


def safetensors_header(tensors: list[OutTensor]) -> bytes:
    """The 8-byte length + JSON header (padded with spaces to 8 bytes, as safetensors does)."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        header[t.name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Writes planned shards in order: ``write(name, tensor)`` must follow the plan's order."""

    def __init__(self, out_dir: Path, shards: list[list[OutTensor]]):
        self.dir, self.shards, self.names = out_dir, shards, shard_names(len(shards))
        self._queue = [(i, t) for i, shard in enumerate(shards) for t in shard]
        self._pos = 0
        self._file = None
        self._current = -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, want = self._queue[self._pos]
        if name != want.name or tuple(tensor.shape) != want.shape or tensor.dtype != want.dtype:
            raise RuntimeError(f"out of plan: got {name} {tuple(tensor.shape)} {tensor.dtype}, expected {want}")
        self._open(shard)
        data = tensor.contiguous().view(torch.uint8).reshape(-1)  # raw bytes, little endian as safetensors
        self._file.write(memoryview(data.numpy()))
        self._pos += 1

    def write_from_file(self, name: str, src: Path, offset: int) -> None:
        """The next planned tensor, ``name``, as the bytes at ``offset`` of ``src`` (copied file to file)."""
        shard, want = self._queue[self._pos]
        if name != want.name:
            raise RuntimeError(f"out of plan: got {name}, expected {want}")
        self._open(shard)
        self._file.copy_from(src, offset, want.nbytes)
        self._pos += 1

    def _open(self, shard: int) -> None:
        if shard != self._current:
            self._close_file()
            self._file = PieceWriter(self.dir / self.names[shard])
            self._file.write(safetensors_header(self.shards[shard]))
            self._current = shard

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._close_file()
        if self._pos != len(self._queue):
            raise RuntimeError(f"{len(self._queue) - self._pos} planned tensors were not written")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
                     "weight_map": {t.name: self.names[i] for i, s in enumerate(self.shards) for t in s}}
            (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# config, tokenizer, generation config


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: cannot read ({e})") from None


def check_base(base: dict, base_path: Path, cfg: dict, fam: ModelFamily) -> None:
    """Refuse a --base-hf that is another model (family or architecture fields differ)."""
    if families.for_hf(base, base_path) is not fam:
        raise ExportError(f"{base_path}: a {base.get('model_type')} model, the checkpoint is {fam.name}")
    for hf_key, nemo_key in CONFIG_FIELDS[:5]:  # layers, hidden, ffn, heads, kv heads
        want = cfg.get(nemo_key) or (cfg["num_attention_heads"] if hf_key == "num_key_value_heads" else None)
        if hf_key in base and base[hf_key] != want:
            raise ExportError(f"{base_path}: {hf_key}={base[hf_key]} but the NeMo checkpoint has {want} "
                              "(--base-hf is another model)")


def build_config(fields: dict, fam: ModelFamily, base: dict | None, special_ids: dict) -> dict:
    """config.json: --base-hf's (every field kept, max_position_embeddings and bos/eos/pad ids
    included) with the model's fields set from NeMo; without a base, what transformers'
    save_pretrained writes for the family, with the NeMo seq_length as max_position_embeddings and
    the tokenizer's special ids."""
    if base is not None:
        out = dict(base)
        out.update({k: v for k, v in fields.items() if k != "max_position_embeddings"})
        if "rope_scaling" not in fields:
            out.pop("rope_scaling", None)
        return out
    from transformers import AutoConfig
    kw = {k: v for k, v in fields.items() if k != "model_type"}
    kw.update({k: v for k, v in special_ids.items() if v is not None})
    cfg = AutoConfig.for_model(fam.model_type, **kw)
    d = cfg.to_diff_dict()  # what save_pretrained writes: non-default fields
    d.pop("_name_or_path", None)
    return d


def copy_tokenizer(src: Path, dest: Path) -> list[str]:
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for n in copied:
        shutil.copyfile(src / n, dest / n)
    if "tokenizer_config.json" not in copied:
        raise ExportError(f"{src}: no tokenizer_config.json")
    has_template = "chat_template.jinja" in copied or "chat_template.json" in copied or \
        "chat_template" in _read_json(src / "tokenizer_config.json")
    if not has_template:
        print(f"warning: {src}: the tokenizer has no chat template", file=sys.stderr)
    return copied


# ---------------------------------------------------------------------------------------------
# the export


def convert(nemo_dir: str | Path, output: str | Path, base_hf: str | Path | None = None, overwrite: bool = False,
            max_shard_size: str | int = "2GB", progress: bool = True, prefetch: bool = True) -> dict:
    """NeMo 2 checkpoint -> HF model dir; returns a small report. With ``prefetch`` one thread reads
    and splits the next tensor while the current one is written (see :func:`_prepared`)."""
    from tqdm import tqdm
    from transformers import AutoTokenizer, GenerationConfig

    t0 = time.perf_counter()
    try:
        ckpt = NemoCheckpoint(nemo_dir)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    if ckpt.adapter_metadata is not None:
        raise ExportError(f"{ckpt.weights_dir}: a LoRA adapter checkpoint (adapter_metadata.json); export it with "
                          "python -m convert.lora_to_peft, or merge it (python -m convert.merge)")
    fam = families.for_nemo(ckpt.model_yaml, ckpt.context_dir / "model.yaml")
    cfg = ckpt.model_config
    base_path = Path(base_hf).absolute() if base_hf else None
    base = _read_json(base_path / "config.json") if base_path else None
    if base is not None:
        check_base(base, base_path / "config.json", cfg, fam)
    tok_src = base_path if base_path else tokenizer_dir(ckpt)
    tok = AutoTokenizer.from_pretrained(str(tok_src), local_files_only=True)
    vocab = true_vocab(ckpt, cfg, base, len(tok))
    entries = plan_tensors(ckpt, fam, cfg, vocab)
    flat = [t for _, _, ts in entries for t in ts]
    shards = plan_shards(flat, parse_size(max_shard_size))
    emb_dtype = ckpt.tensors["embedding.word_embeddings.weight"][1]
    fields = fam.hf_config_fields(cfg, vocab_size=vocab, torch_dtype=DTYPE_NAMES[emb_dtype])
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = build_config(fields, fam, base, special)
    attn = AttentionShape.from_nemo(cfg)
    inputs = (Path(nemo_dir),) + ((base_path,) if base_path else ())
    with atomic_dir(output, overwrite, inputs=inputs) as tmp:
        writer = ShardWriter(tmp, shards)
        bar = tqdm(total=sum(t.nbytes for t in flat), unit="B", unit_scale=True, desc="export", disable=not progress)
        for outs, data in _prepared(entries, ckpt, attn, vocab, budget=parse_size(max_shard_size), prefetch=prefetch):
            for t, d in zip(outs, data):
                if isinstance(d, tuple):
                    writer.write_from_file(t.name, *d)
                else:
                    writer.write(t.name, d)
                bar.update(t.nbytes)
            del data
        writer.close()
        bar.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if base_path and (base_path / "generation_config.json").is_file():
            shutil.copyfile(base_path / "generation_config.json", tmp / "generation_config.json")
        else:
            GenerationConfig(**{k: config.get(k) for k in special}).save_pretrained(tmp)
        copied = copy_tokenizer(tok_src, tmp)
    return {"output": str(Path(output).absolute()), "family": fam.name, "vocab_size": vocab,
            "tensors": len(flat), "shards": len(shards), "bytes": sum(t.nbytes for t in flat),
            "tokenizer_from": str(tok_src), "tokenizer_files": copied, "seconds": round(time.perf_counter() - t0, 2)}


def _file_slices(ckpt: NemoCheckpoint, row, layer, attn: AttentionShape, vocab: int, outs) -> list | None:
    """``[(file, offset), ...]`` per HF tensor of one entry when each is a run of whole rows of the
    Megatron tensor held in one chunk record (everything but a reordered q/k/v): ``row.to_hf`` runs
    on a meta tensor, and an output that is a contiguous view of it gives its rows."""
    shape, dtype = ckpt.tensors[row.dist_key]
    root = torch.empty(tuple(shape[1:]) if layer is not None else tuple(shape), dtype=dtype, device="meta")
    if root.dim() == 0 or root.numel() == 0:
        return None
    src = root[:vocab] if row.dist_key in PADDED_ROWS else root
    row_elems = root[0].numel()
    found = []
    for o, want in zip(row.to_hf(src, attn), outs):
        if not o.is_contiguous() or not (o is root or o._base is root) or tuple(o.shape) != tuple(want.shape):
            return None
        if o.storage_offset() % row_elems or (o.dim() and o[0].numel() != row_elems):
            return None
        lo = o.storage_offset() // row_elems
        loc = ckpt.rows_location(row.dist_key, layer, lo, lo + (o.shape[0] if o.dim() else 1))
        if loc is None:
            return None
        found.append(loc)
    return found


def _prepared(entries: list[tuple], ckpt: NemoCheckpoint, attn: AttentionShape, vocab: int, budget: int,
              prefetch: bool = True):
    """Yields ``(outs, data)`` per plan entry, one item per HF tensor of one Megatron tensor: its
    ``(file, offset)`` when :func:`_file_slices` finds it as whole rows of one record (copied file to
    file), else the tensors, mapped from the ``.distcp`` file (``load_layer(mapped=True)``), split
    and contiguous. With ``prefetch`` the next entry is prepared on
    one worker thread while the caller writes the current one, when both entries, read and split
    (twice their bytes), fit in ``budget`` (the output shard size: the memory benchmark's bound allows
    one shard plus one layer); otherwise it is read after the write, as without prefetch."""
    def load(i: int) -> list:
        row, layer, outs = entries[i]
        located = _file_slices(ckpt, row, layer, attn, vocab, outs)
        if located is not None:
            return located
        tensor = ckpt.load_layer(row.dist_key, layer, mapped=True)
        if row.dist_key in PADDED_ROWS:
            tensor = tensor[:vocab]
        return [d.contiguous() for d in row.to_hf(tensor, attn)]

    size = [sum(t.nbytes for t in outs) for _, _, outs in entries]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nemo_to_hf-read") as pool:
        pending = pool.submit(load, 0) if entries else None
        for i, (_, _, outs) in enumerate(entries):
            data = pending.result()
            ahead = i + 1 < len(entries) and prefetch and 2 * (size[i] + size[i + 1]) <= budget
            pending = pool.submit(load, i + 1) if ahead else None
            yield outs, data
            del data
            if pending is None and i + 1 < len(entries):
                pending = pool.submit(load, i + 1)


def import_dependencies() -> None:
    """Import everything an export uses (the memory benchmark measures RSS after this)."""
    import torch.distributed.checkpoint  # noqa: F401
    import tqdm  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.nemo_to_hf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nemo", required=True, help="NeMo 2 checkpoint dir (context/ + weights/), full model")
    ap.add_argument("--output", required=True, help="HF model dir to create")
    ap.add_argument("--base-hf", help="the HF model it came from: config fields NeMo does not keep "
                                      "(max_position_embeddings, bos/eos/pad ids, ...), tokenizer files, "
                                      "generation_config.json")
    ap.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--no-prefetch", action="store_true",
                    help="read each tensor after the previous one is written (default: read the next one on a "
                         "thread while one is written, when both fit in --max-shard-size)")
    args = ap.parse_args(argv)

    def call():
        keep_freed_memory()
        import_dependencies()
        return convert(args.nemo, args.output, base_hf=args.base_hf, overwrite=args.overwrite,
                       max_shard_size=args.max_shard_size, progress=not args.no_progress,
                       prefetch=not args.no_prefetch)

    return run_json_command(call, (ExportError, UnsupportedModelError, FileExistsError,
                                   FileNotFoundError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
