"""Peak memory and throughput of the streaming HF <-> NeMo converters against a plain file copy.

    python -m benchmarks.convert_memory --size-gb 2 --workdir /tmp/convmem [--dtype bfloat16] \\
        [--shard-size 1GB] [--repeat 5] [--min-ratio 0.5] [--json results.json] [--keep]

1. Builds a random Llama of about ``--size-gb`` in ``WORKDIR/hf`` without ever holding it whole:
   wide layers (hidden 2048, ffn 8192, GQA 16/4 heads) so a few layers make a few GB, written shard
   by shard as sharded safetensors, plus the tiny tokenizer of :mod:`recipes.models`.
2. Runs three children, one at a time: (a) a plain copy of the same shard bytes
   (``shutil.copyfile``), (b) ``python -m convert.hf_to_nemo``, (c) ``python -m convert.nemo_to_hf``
   (shards of the same size as the input). Peak RSS is the child's own ``ru_maxrss`` from
   ``os.wait4`` (the kernel's high-water mark: anonymous and file-mapped pages, so a converter that
   mmaps whole shards pays for them; the page cache does not count). Each child first runs its
   imports (``import_dependencies()``), reports its peak RSS then (the interpreter baseline) and
   waits; the benchmark removes that tool's previous output, settles the machine (below) and lets
   it go, so every tool starts its work from the same state.
3. Bound per converter: peak RSS <= baseline + largest input shard + one decoder layer's tensors.
   Throughput is the model bytes over the tool's own conversion seconds (imports excluded); the
   wall time of each child is reported too, and each converter's throughput as a ratio to the
   copy's, measured in the same run (``--min-ratio R``: exit status 3 when one is below R). With
   ``--repeat N`` (default 5) the three runs go round N times and each tool's fastest round counts
   (all rounds' seconds are in the JSON; the peak RSS checked is the highest of any round).
   Settling (:func:`settle`): ``os.sync()``, so none starts with another's dirty pages to write
   back (the kernel throttles a writer that has too many), then a fixed pause. On a VM whose
   balloon reports free pages to its host (virtio-balloon ``F_REPORTING``, recorded in the JSON),
   memory freed a few seconds ago goes back to the host and the first write to it faults there:
   measured on this CI VM, ``dd`` of 1 GB into the page cache ran at 5 GB/s right after another
   file was deleted and at 0.4 GB/s three seconds later. Before the gate, the copy (which starts in
   0.1 s) wrote into just-freed memory and the converters (which import for 5-12 s) did not.

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


SETTLE_S = 3.0  # > the kernel's PAGE_REPORTING_DELAY (2 s)


def settle(seconds: float = SETTLE_S) -> None:
    """The same starting state for every measured child: no dirty pages, freed memory reported."""
    os.sync()
    time.sleep(seconds)


def free_page_reporting() -> bool | None:
    """Whether a virtio balloon reports free pages to the host (feature bit 5); None off such VMs."""
    bits = [p.read_text().strip() for p in Path("/sys/bus/virtio/drivers/virtio_balloon").glob("virtio*/features")]
    return any(len(b) > 5 and b[5] == "1" for b in bits) if bits else None


_READY = "CONVERT_MEMORY_READY "


def gated_args(tool: str, argv: list[str]) -> list[str]:
    """``python`` args for a child that runs ``tool``'s imports, reports its peak RSS so far (the
    interpreter baseline) with a ready line on stderr, waits for a line on stdin, then runs ``tool``
    (``copy``: :func:`copy_files` of ``argv``'s two dirs; else ``convert.<tool>.main(argv)``)."""
    if tool == "copy":
        imports = "import json\nfrom benchmarks.convert_memory import copy_files\n"
        work = f"print(json.dumps(copy_files(*{argv!r})))\n"
    else:
        imports = f"import convert.{tool} as m\nm.import_dependencies()\n"
        work = f"sys.exit(m.main({argv!r}))\n"
    return ["-c", "import resource, sys\n" + imports +
            f"sys.stderr.write({_READY!r} + str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) + '\\n')\n"
            "sys.stderr.flush()\nsys.stdin.readline()\n" + work]


def run_child(args: list[str], gate) -> dict:
    """Run ``python ARGS`` (a :func:`gated_args` child) in the repo: once it is ready ``gate()`` runs,
    then the child goes on. Returns rc, wall seconds from then, peak RSS bytes, its peak when ready
    (``baseline_rss_bytes``, missing when it never got ready) and its last JSON line."""
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    wrapper = f"MARK = {_MARK!r}\n" + _WRAPPER
    res = {}
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen([sys.executable, "-c", wrapper, *args], cwd=ROOT, env=env, text=True,
                             stdin=subprocess.PIPE, stdout=out, stderr=subprocess.PIPE)
        err = []
        for line in p.stderr:
            err.append(line)
            if line.startswith(_READY):
                res["baseline_rss_bytes"] = int(line[len(_READY):])
                gate()
                p.stdin.write("go\n")
                break
        t = time.perf_counter()
        p.stdin.close()
        err.append(p.stderr.read())
        p.wait()
        wall = time.perf_counter() - t
        out.seek(0)
        stdout = out.read()
    stderr = "".join(err)
    marks = [ln for ln in stderr.splitlines() if ln.startswith(_MARK)]
    if p.returncode != 0 or not marks:
        raise RuntimeError(f"measuring wrapper failed (rc {p.returncode}): {stderr[-2000:]}")
    m = json.loads(marks[-1][len(_MARK):])
    report = next((json.loads(ln) for ln in reversed(stdout.splitlines()) if ln.startswith("{")), None)
    res.update({"rc": m["rc"], "wall_s": round(wall, 3), "peak_rss_bytes": m["peak"], "report": report})
    if m["rc"] != 0 or "baseline_rss_bytes" not in res:
        res["stderr_tail"] = stderr[-2000:]
    return res


def check_bound(peak_rss: int, baseline_rss: int, largest_shard: int, layer: int) -> dict:
    """The quality bar: peak <= baseline + largest shard + one layer. Returns bound, margin and ok."""
    bound = baseline_rss + largest_shard + layer
    return {"bound_bytes": bound, "above_baseline_bytes": peak_rss - baseline_rss,
            "margin_bytes": bound - peak_rss, "ok": peak_rss <= bound}


def run_benchmark(workdir: str | Path, size_gb: float, dtype: str = "float32", shard_bytes: int = 10**9,
                  shape: dict | None = None, keep: bool = False, repeat: int = 1, settle_s: float = SETTLE_S) -> dict:
    """Build the model, then ``repeat`` rounds of copy, hf_to_nemo, nemo_to_hf; each tool's fastest
    round is its result (see :func:`best_of`)."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    work = Path(workdir).absolute()
    hf, nemo, back, copy = work / "hf", work / "nemo", work / "hf_back", work / "copy"
    for d in (hf, nemo, back, copy):
        if d.exists():
            raise FileExistsError(f"{d}: exists; use an empty --workdir")
    t0 = time.perf_counter()
    model = build_random_llama(hf, size_gb, dtype, shard_bytes, shape)
    model["build_seconds"] = round(time.perf_counter() - t0, 1)
    runs = {
        "copy": gated_args("copy", [str(hf), str(copy)]),
        "hf_to_nemo": gated_args("hf_to_nemo", ["--hf", str(hf), "--output", str(nemo), "--no-progress"]),
        "nemo_to_hf": gated_args("nemo_to_hf", ["--nemo", str(nemo), "--output", str(back), "--no-progress",
                                                "--max-shard-size", str(shard_bytes)]),
    }
    outputs = {"copy": copy, "hf_to_nemo": nemo, "nemo_to_hf": back}
    results = {}
    try:
        for _ in range(repeat):
            for name, args in runs.items():
                def gate(out=outputs[name]):
                    shutil.rmtree(out, ignore_errors=True)  # the previous round's, freed now
                    settle(settle_s)

                r = run_child(args, gate)
                if r["rc"] != 0 or "baseline_rss_bytes" not in r:
                    raise RuntimeError(f"{name} failed (rc {r['rc']}): {r.get('stderr_tail')}")
                secs = (r["report"] or {}).get("seconds") or r["wall_s"]
                r.update(gb_per_s=round(model["bytes"] / 1e9 / secs, 3) if secs else None, seconds=secs)
                if name != "copy":
                    r.update(check_bound(r["peak_rss_bytes"], r["baseline_rss_bytes"], model["largest_shard_bytes"],
                                         model["layer_bytes"]))
                results.setdefault(name, []).append(r)
        results = {name: best_of(rs) for name, rs in results.items()}
        add_ratios(results)
    finally:
        if not keep:
            for d in (hf, nemo, back, copy):
                shutil.rmtree(d, ignore_errors=True)
    return {"model": model, "runs": results, "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"),
            "settle_s": settle_s, "free_page_reporting": free_page_reporting()}


def best_of(rounds: list[dict]) -> dict:
    """A tool's fastest round (as ``timeit`` advises: the slower ones measure interference), with
    every round's seconds; its peak RSS is the highest of any round, checked against the bound."""
    best = dict(min(rounds, key=lambda r: r["seconds"]))
    best["rounds_s"] = [r["seconds"] for r in rounds]
    peak = max(r["peak_rss_bytes"] for r in rounds)
    best["peak_rss_bytes"] = peak
    if "bound_bytes" in best:
        best.update(above_baseline_bytes=peak - best["baseline_rss_bytes"], margin_bytes=best["bound_bytes"] - peak,
                    ok=all(r["ok"] for r in rounds))
    return best


def add_ratios(runs: dict) -> None:
    """Each converter's throughput over the copy's (``ratio_to_copy``), in place."""
    copy = (runs.get("copy") or {}).get("gb_per_s")
    for name, r in runs.items():
        if name != "copy":
            r["ratio_to_copy"] = round(r["gb_per_s"] / copy, 3) if copy and r.get("gb_per_s") else None


def below_ratio(runs: dict, min_ratio: float) -> list[str]:
    """The converters whose ratio to the copy is below ``min_ratio`` (or unknown)."""
    return [n for n, r in runs.items() if n != "copy" and (r.get("ratio_to_copy") or 0) < min_ratio]


def format_table(res: dict) -> str:
    m = res["model"]
    mb = 1e6
    lines = [f"model: {m['layers']} layers, {m['dtype']}, {m['bytes'] / 1e9:.2f} GB in {m['shards']} shards "
             f"(largest {m['largest_shard_bytes'] / mb:.0f} MB), one layer {m['layer_bytes'] / mb:.0f} MB",
             f"{'run':<11} {'wall s':>7} {'work s':>7} {'GB/s':>6} {'peak MB':>8} {'base MB':>8} "
             f"{'+MB':>7} {'bound MB':>9} ok  {'x copy':>6}"]
    for name, r in res["runs"].items():
        bound = f"{r['bound_bytes'] / mb:9.0f}" if "bound_bytes" in r else f"{'-':>9}"
        ok = ("yes" if r["ok"] else "NO ") if "ok" in r else "-  "
        ratio = f"{r['ratio_to_copy']:6.2f}" if r.get("ratio_to_copy") is not None else f"{'-':>6}"
        lines.append(f"{name:<11} {r['wall_s']:7.2f} {r['seconds']:7.2f} {r['gb_per_s'] or 0:6.2f} "
                     f"{r['peak_rss_bytes'] / mb:8.0f} {r['baseline_rss_bytes'] / mb:8.0f} "
                     f"{(r['peak_rss_bytes'] - r['baseline_rss_bytes']) / mb:7.0f} {bound} {ok} {ratio}")
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
    ap.add_argument("--repeat", type=int, default=5,
                    help="rounds of the three runs; each tool's fastest counts (default 5)")
    ap.add_argument("--min-ratio", type=float, help="exit 3 when a converter's throughput is below this "
                                                    "fraction of the plain copy's (e.g. 0.5)")
    args = ap.parse_args(argv)
    from convert.nemo_to_hf import parse_size
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    shape = {"hidden": args.hidden, "ffn": 4 * args.hidden, "heads": max(1, args.hidden // 128),
             "kv_heads": max(1, args.hidden // 512)}
    try:
        res = run_benchmark(args.workdir, args.size_gb, args.dtype, parse_size(args.shard_size), shape, args.keep,
                            repeat=args.repeat)
    except (FileExistsError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.json) if args.json else Path(args.workdir) / "convert_memory.json"
    write_json_atomic(out, res)
    print(format_table(res))
    print(f"results: {out}")
    if not all(r.get("ok", True) for r in res["runs"].values()):
        print("error: peak memory above the bound", file=sys.stderr)
        return 2
    slow = below_ratio(res["runs"], args.min_ratio) if args.min_ratio is not None else []
    if slow:
        print(f"error: below {args.min_ratio} of the copy's throughput: {', '.join(slow)}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
