"""Peak memory and throughput of the streaming HF <-> NeMo converters against a plain file copy.

    python -m benchmarks.convert_memory --size-gb 2 --workdir /tmp/convmem [--dtype bfloat16] \\
        [--shard-size 1GB] [--json results.json] [--keep]

1. Builds a random Llama of about ``--size-gb`` in ``WORKDIR/hf`` without ever holding it whole:
   wide layers (hidden 2048, ffn 8192, GQA 16/4 heads) so a few layers make a few GB, written shard
   by shard as sharded safetensors, plus the tiny tokenizer of :mod:`recipes.models`.
2. Runs three children, one at a time: (a) a plain copy of the same shard bytes
   (``shutil.copyfile``), (b) ``python -m convert.hf_to_nemo``, (c) ``python -m convert.nemo_to_hf``
   (shards of the same size as the input). Peak RSS is the child's own ``ru_maxrss`` from
   ``os.wait4`` (the kernel's high-water mark: anonymous and file-mapped pages, so a converter that
   mmaps whole shards pays for them; the page cache does not count). Each tool's interpreter
   baseline is a child that only runs its imports (``import_dependencies()``).
3. Bound per converter: peak RSS <= baseline + largest input shard + one decoder layer's tensors.
   Throughput is the model bytes over the tool's own conversion seconds (imports excluded); the
   wall time of each child is reported too.

Prints a table and writes the JSON (default ``WORKDIR/convert_memory.json``); the model dirs are
removed afterwards unless ``--keep``. Children get ``OMP_NUM_THREADS=1``. The shards are in the page
cache after they are built, so the copy and the converters all read from memory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import families
from recipes.fileio import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")
SHAPE = {"hidden": 2048, "ffn": 8192, "heads": 16, "kv_heads": 4, "vocab": 1000}


# ---------------------------------------------------------------------------------------------
# the model


def layer_bytes(shape: dict, dtype_bytes: int) -> int:
    """Bytes of one decoder layer's tensors (q, k, v, o, gate, up, down, two norms)."""
    h, f = shape["hidden"], shape["ffn"]
    kv = h // shape["heads"] * shape["kv_heads"]
    return (h * h * 2 + 2 * kv * h + 3 * h * f + 2 * h) * dtype_bytes


def build_random_llama(out: str | Path, size_gb: float, dtype: str = "float32", shard_bytes: int = 10**9,
                       shape: dict | None = None, seed: int = 0) -> dict:
    """A random Llama of about ``size_gb`` (at least one layer), written shard by shard; returns its facts."""
    import torch
    from safetensors.torch import save_file

    from recipes.models import train_tiny_tokenizer

    shape = dict(SHAPE, **(shape or {}))
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    nb = tdtype.itemsize
    h, f, vocab = shape["hidden"], shape["ffn"], shape["vocab"]
    lb = layer_bytes(shape, nb)
    layers = max(1, round((size_gb * 1e9 - vocab * h * nb * 2) / lb))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, norm=False):
        t = torch.randn(*s, generator=g, dtype=torch.float32)
        return (1.0 + 0.1 * t if norm else 0.02 * t).to(tdtype)

    kv = h // shape["heads"] * shape["kv_heads"]

    def layer_tensors(i):
        p = f"model.layers.{i}."
        return {p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
                p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
                p + "mlp.down_proj.weight": rnd(h, f), p + "input_layernorm.weight": rnd(h, norm=True),
                p + "post_attention_layernorm.weight": rnd(h, norm=True)}

    # tensors in HF order, grouped into shards by size (transformers' rule), each shard built and saved alone
    groups = [["embed"], *[[i] for i in range(layers)], ["final"]]
    shards, cur, size = [], [], 0
    sizes = {"embed": vocab * h * nb, "final": (h + vocab * h) * nb}
    for grp in groups:
        b = sizes.get(grp[0], lb)
        if cur and size + b > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur += grp
        size += b
    shards.append(cur)
    weight_map, total = {}, 0
    for k, members in enumerate(shards, 1):
        tensors = {}
        for m in members:
            if m == "embed":
                tensors["model.embed_tokens.weight"] = rnd(vocab, h)
            elif m == "final":
                tensors["model.norm.weight"] = rnd(h, norm=True)
                tensors["lm_head.weight"] = rnd(vocab, h)
            else:
                tensors.update(layer_tensors(m))
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
    tok = train_tiny_tokenizer(vocab)
    tok.save_pretrained(out)
    fam = families.get(families.DEFAULT_FAMILY)  # the Llama rows layer_tensors writes
    config = {"architectures": list(fam.architectures[:1]), "model_type": fam.model_type, "hidden_size": h,
              "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": shape["heads"],
              "num_key_value_heads": shape["kv_heads"], "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
              "torch_dtype": dtype, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
              "pad_token_id": tok.pad_token_id}
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    largest = max((out / n).stat().st_size for n in set(weight_map.values()))
    return {"dir": str(out), "layers": layers, "dtype": dtype, "bytes": total, "shards": len(shards),
            "largest_shard_bytes": largest, "layer_bytes": lb}


# ---------------------------------------------------------------------------------------------
# measuring children


def copy_files(src: str | Path, dst: str | Path, suffix: str = ".safetensors") -> dict:
    """The baseline: copy every ``*suffix`` file byte for byte (what a converter must at least do)."""
    t0 = time.perf_counter()
    Path(dst).mkdir(parents=True, exist_ok=True)
    n = 0
    for p in sorted(Path(src).glob(f"*{suffix}")):
        shutil.copyfile(p, Path(dst) / p.name)
        n += p.stat().st_size
    return {"bytes": n, "seconds": round(time.perf_counter() - t0, 3)}


# A fresh, small interpreter that forks+execs the measured command and reports the child's own
# ru_maxrss from wait4. Measuring straight from this (large) process would be wrong: Linux folds the
# pre-exec memory high-water mark into the child's ru_maxrss, and Python's subprocess vforks, so every
# child would inherit this process's peak.
_WRAPPER = ("import json, os, sys, time\n"
            "t = time.perf_counter()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
            "_, status, ru = os.wait4(pid, 0)\n"
            "print(MARK + json.dumps({'rc': os.waitstatus_to_exitcode(status), 'peak': ru.ru_maxrss * 1024, "
            "'wall': time.perf_counter() - t}), file=sys.stderr)\n")
_MARK = "CONVERT_MEMORY_CHILD "


def run_child(args: list[str]) -> dict:
    """Run ``python ARGS`` in the repo; returns rc, wall seconds, peak RSS bytes and its last JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    wrapper = f"MARK = {_MARK!r}\n" + _WRAPPER
    p = subprocess.run([sys.executable, "-c", wrapper, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = p.stderr.splitlines()
    marks = [ln for ln in lines if ln.startswith(_MARK)]
    if p.returncode != 0 or not marks:
        raise RuntimeError(f"measuring wrapper failed (rc {p.returncode}): {p.stderr[-2000:]}")
    m = json.loads(marks[-1][len(_MARK):])
    report = next((json.loads(ln) for ln in reversed(p.stdout.splitlines()) if ln.startswith("{")), None)
    res = {"rc": m["rc"], "wall_s": round(m["wall"], 3), "peak_rss_bytes": m["peak"], "report": report}
    if m["rc"] != 0:
        res["stderr_tail"] = p.stderr[-2000:]
    return res


def baseline_args(tool: str) -> list[str]:
    """A child that only imports what ``tool`` imports (its RSS is the interpreter baseline)."""
    if tool == "copy":
        return ["-c", "import shutil, json; from benchmarks.convert_memory import copy_files"]
    return ["-c", f"import convert.{tool} as m; m.import_dependencies()"]


def check_bound(peak_rss: int, baseline_rss: int, largest_shard: int, layer: int) -> dict:
    """The quality bar: peak <= baseline + largest shard + one layer. Returns bound, margin and ok."""
    bound = baseline_rss + largest_shard + layer
    return {"bound_bytes": bound, "above_baseline_bytes": peak_rss - baseline_rss,
            "margin_bytes": bound - peak_rss, "ok": peak_rss <= bound}


def run_benchmark(workdir: str | Path, size_gb: float, dtype: str = "float32", shard_bytes: int = 10**9,
                  shape: dict | None = None, keep: bool = False) -> dict:
    work = Path(workdir).absolute()
    hf, nemo, back, copy = work / "hf", work / "nemo", work / "hf_back", work / "copy"
    for d in (hf, nemo, back, copy):
        if d.exists():
            raise FileExistsError(f"{d}: exists; use an empty --workdir")
    t0 = time.perf_counter()
    model = build_random_llama(hf, size_gb, dtype, shard_bytes, shape)
    model["build_seconds"] = round(time.perf_counter() - t0, 1)
    runs = {
        "copy": ["-c", f"import json; from benchmarks.convert_memory import copy_files; "
                       f"print(json.dumps(copy_files({str(hf)!r}, {str(copy)!r})))"],
        "hf_to_nemo": ["-m", "convert.hf_to_nemo", "--hf", str(hf), "--output", str(nemo), "--no-progress"],
        "nemo_to_hf": ["-m", "convert.nemo_to_hf", "--nemo", str(nemo), "--output", str(back), "--no-progress",
                       "--max-shard-size", str(shard_bytes)],
    }
    results = {}
    try:
        for name, args in runs.items():
            base = run_child(baseline_args(name))
            r = run_child(args)
            if r["rc"] != 0:
                raise RuntimeError(f"{name} failed (rc {r['rc']}): {r.get('stderr_tail')}")
            secs = (r["report"] or {}).get("seconds") or r["wall_s"]
            r.update(baseline_rss_bytes=base["peak_rss_bytes"], baseline_wall_s=base["wall_s"],
                     gb_per_s=round(model["bytes"] / 1e9 / secs, 3) if secs else None, seconds=secs)
            if name != "copy":
                r.update(check_bound(r["peak_rss_bytes"], base["peak_rss_bytes"], model["largest_shard_bytes"],
                                     model["layer_bytes"]))
            results[name] = r
    finally:
        if not keep:
            for d in (hf, nemo, back, copy):
                shutil.rmtree(d, ignore_errors=True)
    return {"model": model, "runs": results, "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1")}


def format_table(res: dict) -> str:
    m = res["model"]
    mb = 1e6
    lines = [f"model: {m['layers']} layers, {m['dtype']}, {m['bytes'] / 1e9:.2f} GB in {m['shards']} shards "
             f"(largest {m['largest_shard_bytes'] / mb:.0f} MB), one layer {m['layer_bytes'] / mb:.0f} MB",
             f"{'run':<11} {'wall s':>7} {'work s':>7} {'GB/s':>6} {'peak MB':>8} {'base MB':>8} "
             f"{'+MB':>7} {'bound MB':>9} ok"]
    for name, r in res["runs"].items():
        bound = f"{r['bound_bytes'] / mb:9.0f}" if "bound_bytes" in r else f"{'-':>9}"
        ok = ("yes" if r["ok"] else "NO") if "ok" in r else "-"
        lines.append(f"{name:<11} {r['wall_s']:7.2f} {r['seconds']:7.2f} {r['gb_per_s'] or 0:6.2f} "
                     f"{r['peak_rss_bytes'] / mb:8.0f} {r['baseline_rss_bytes'] / mb:8.0f} "
                     f"{(r['peak_rss_bytes'] - r['baseline_rss_bytes']) / mb:7.0f} {bound} {ok}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.convert_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="model size to build (default 2)")
    ap.add_argument("--workdir", required=True, help="scratch dir (needs ~4x the size free; cleaned up)")
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--shard-size", default="1GB", help="safetensors shard size of the built model and the export")
    ap.add_argument("--hidden", type=int, default=SHAPE["hidden"], help="hidden size (ffn = 4x)")
    ap.add_argument("--json", help="results file (default WORKDIR/convert_memory.json)")
    ap.add_argument("--keep", action="store_true", help="keep the model dirs")
    args = ap.parse_args(argv)
    from convert.nemo_to_hf import parse_size
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    shape = {"hidden": args.hidden, "ffn": 4 * args.hidden, "heads": max(1, args.hidden // 128),
             "kv_heads": max(1, args.hidden // 512)}
    try:
        res = run_benchmark(args.workdir, args.size_gb, args.dtype, parse_size(args.shard_size), shape, args.keep)
    except (FileExistsError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.json) if args.json else Path(args.workdir) / "convert_memory.json"
    write_json_atomic(out, res)
    print(format_table(res))
    print(f"results: {out}")
    return 0 if all(r.get("ok", True) for r in res["runs"].values()) else 2


if __name__ == "__main__":
    sys.exit(main())
