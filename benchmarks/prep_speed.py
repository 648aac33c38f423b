"""Data-preparation throughput: ``recipes.data.prepare`` on N pairs against one batch call of the same
tokenizer over the same texts, measured in one run (a ratio, so a noisy machine still compares).

    OMP_NUM_THREADS=1 python -m benchmarks.prep_speed --pairs 100000 --tokenizer artifacts/models/tiny \\
        [--workdir /tmp/prep_speed] [--max-ratio 2.0] [--json OUT] [--command]

The input is built here: the demo pairs (datasets/demo_pairs.jsonl) repeated with distinct text (a
counter in each draft and final) and distinct months (one month per 100-pair block, so the time split
is that of a long history). The reference is one ``tokenizer(texts, add_special_tokens=False)`` call over
the rendered prompts and the finals that ``prepare`` tokenises (2N texts). ``--max-ratio R`` exits 1 when
prepare takes more than R times the batch call. ``--command`` times the whole ``python -m
recipes.prepare_data`` command instead (in this process), its fact-fidelity report included.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "datasets" / "demo_pairs.jsonl"


def build_pairs(n: int, out: Path) -> Path:
    """N raw pairs (JSONL) from the demo pairs: distinct text and months, the draft/final style kept."""
    base = [json.loads(line) for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = []
    for i in range(n):
        r = dict(base[i % len(base)])
        block = i // len(base)
        y, m = 2000 + block // 12, block % 12 + 1
        r["date"] = f"{y:04d}-{m:02d}"
        tag = f"（第{i}号）"
        r["draft"] = r["draft"] + tag
        r["final"] = r["final"] + tag
        lines.append(json.dumps(r, ensure_ascii=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def measure(pairs: int, tokenizer_dir: str | Path, workdir: str | Path | None = None, command: bool = False) -> dict:
    """Seconds of prepare() (``command``: of the whole ``python -m recipes.prepare_data`` command, its
    fact-fidelity report included) and of the one batch tokenizer call, their ratio and rows/s."""
    import contextlib
    import io

    from recipes import prepare_data
    from recipes.data import load_tokenizer, prepare, read_prepared

    work = Path(workdir or tempfile.mkdtemp(prefix="prep_speed-"))
    src = build_pairs(pairs, work / "pairs.jsonl")
    out = work / "prepared"
    tok = load_tokenizer(tokenizer_dir)  # imports transformers before either clock starts
    t0 = time.perf_counter()
    if command:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            rc = prepare_data.main(["--input", str(src), "--output", str(out), "--tokenizer", str(tokenizer_dir),
                                    "--seq-length", "512", "--overwrite"])
        if rc != 0:
            raise RuntimeError(f"recipes.prepare_data exited {rc}: {err.getvalue()[-2000:]}")
        stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    else:
        stats = prepare(src, out, tokenizer_dir, seq_length=512, overwrite=True)
    t_prepare = time.perf_counter() - t0
    texts = [t for split in ("training", "validation", "test") for r in read_prepared(out / f"{split}.jsonl")
             for t in (r["input"], r["output"])]
    t0 = time.perf_counter()
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    t_batch = time.perf_counter() - t0
    return {"pairs": pairs, "rows_written": sum(stats["rows"].values()), "texts": len(texts),
            "tokens": sum(map(len, ids)), "prepare_s": round(t_prepare, 2), "batch_tokenize_s": round(t_batch, 2),
            "ratio": round(t_prepare / t_batch, 2), "rows_per_s": round(pairs / t_prepare),
            "measured": "python -m recipes.prepare_data" if command else "recipes.data.prepare",
            "tokenizer": str(tokenizer_dir), "workdir": str(work)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prep_speed", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=100_000, help="pairs to build and prepare (default 100000)")
    ap.add_argument("--tokenizer", required=True, help="HF model/tokenizer dir (e.g. python -m recipes.models tiny)")
    ap.add_argument("--workdir", help="where the input and the prepared output go (default: a temp dir)")
    ap.add_argument("--max-ratio", type=float, help="exit 1 when prepare takes more than this times the batch call")
    ap.add_argument("--json", metavar="OUT", help="also write the result as JSON")
    ap.add_argument("--command", action="store_true", help="time the whole `python -m recipes.prepare_data` "
                                                           "command (with its fact-fidelity report), not prepare()")
    args = ap.parse_args(argv)
    result = measure(args.pairs, args.tokenizer, args.workdir, command=args.command)
    print(json.dumps(result))
    if args.json:
        from recipes.fileio import write_json_atomic
        write_json_atomic(args.json, result)
    if args.max_ratio is not None and result["ratio"] > args.max_ratio:
        print(f"FAIL: {result['measured']} took {result['ratio']}x the batch tokenizer call (> {args.max_ratio})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
