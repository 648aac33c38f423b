"""Greedy generation over a prepared test.jsonl, with an optional PEFT (LoRA) adapter.

Each line of the test file is a NeMo fine-tuning record: ``input`` is the prompt already rendered
with the model's chat template up to the assistant header (recipes.prompt.render_prompt), ``output``
is the reference final comment, plus ``id``, ``date``, ``section`` and ``fund``. The prompt is
tokenised without special tokens (the template already holds them), prompts are left-padded with
the pad token (never eos) so a batch generates together, decoding is greedy, generation stops at
eos (``<|im_end|>``), and only the new tokens are decoded. Batched and one-by-one runs give the same
predictions (tests/test_generate.py checks it).

Output: JSONL with {"id", "section", "date", "prediction", "reference"} per record, or, when the
output path ends in ``.txt``, one prediction per line (newlines inside a prediction become spaces)
for ``sacrebleu``/``benchmarks.bleu``. The file is written to a temp path and renamed. ::

    python -m recipes.generate --model runs/models/smollm2-135m --adapter runs/hf/adapter \\
        --data data/test.jsonl --output runs/hf/predictions.jsonl --max-new-tokens 256
"""
from __future__ import annotations

import os

# Generation never downloads; set before transformers/huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import sys
from pathlib import Path

from recipes.fileio import iter_jsonl, write_text_atomic

OUTPUT_FIELDS = ("id", "section", "date", "prediction", "reference")


def read_records(path: str | Path, limit: int | None = None) -> list[dict]:
    """The records of a prepared JSONL file (first ``limit`` ones); each must have a string "input"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    records: list[dict] = []
    for lineno, row in iter_jsonl(path):
        if limit is not None and len(records) >= limit:
            break
        if not isinstance(row.get("input"), str) or not row["input"]:
            raise ValueError(f"{path}:{lineno}: field 'input' must be a non-empty string, got {row.get('input')!r}")
        if row.get("output") is not None and not isinstance(row["output"], str):
            raise ValueError(f"{path}:{lineno}: field 'output' must be a string, got {row['output']!r}")
        records.append(row)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def load_model(model_dir: str | Path, adapter_dir: str | Path | None = None, device: str | None = None):
    """(model, tokenizer) ready for left-padded greedy generation, from local files only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model dir (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.padding_side = "left"  # decoder-only: the new tokens must follow each prompt directly
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{model_dir}: tokenizer has no eos token")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(f"{model_dir}: tokenizer needs a pad token distinct from eos "
                         f"(pad={tokenizer.pad_token!r}, eos={tokenizer.eos_token!r}); build presets with recipes.models")
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype="auto", local_files_only=True)
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter_dir}: not a PEFT adapter dir (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return model, tokenizer


def _stop_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)  # ChatML turn end, in case a tokenizer's eos is another token
    return ids


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> dict:
    """input_ids/attention_mask with the pad on the left, so every prompt ends at the last column."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def generate_texts(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 256, batch_size: int = 4,
                   progress: bool = True) -> list[str]:
    """Greedy completions of ``prompts`` (in order), decoded from the new tokens only and stripped."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if max_new_tokens <= 0 or batch_size <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must be > 0")
    stop = _stop_ids(tokenizer)
    # A fresh config, not the model's: sampling settings in a generation_config.json must not leak in.
    gen_cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stop,
                               pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    with tqdm(total=len(prompts), desc="generate", unit="seg", disable=not progress) as bar, torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = _left_pad([encoded[i] for i in idx], tokenizer.pad_token_id, device)
            out = model.generate(**batch, generation_config=gen_cfg)
            new = out[:, batch["input_ids"].shape[1]:].tolist()
            for i, ids in zip(idx, new):
                cut = next((j for j, t in enumerate(ids) if t in stop), len(ids))
                results[i] = tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()
            bar.update(len(idx))
    return results


def write_predictions(rows: list[dict], output_path: str | Path) -> None:
    """Write JSONL (or one prediction per line for ``.txt``) atomically."""
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    if output_path.suffix.lower() == ".txt":
        text = "".join(" ".join(r["prediction"].splitlines()) + "\n" for r in rows)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_text_atomic(output_path, text)


def generate(model_dir: str | Path, data_path: str | Path, output_path: str | Path,
             adapter_dir: str | Path | None = None, max_new_tokens: int = 256, limit: int | None = None,
             batch_size: int = 4, *, progress: bool = True) -> list[dict]:
    """Generate a prediction for each record of ``data_path`` and write them to ``output_path``.

    Returns the written rows ({"id", "section", "date", "prediction", "reference"}).
    """
    data_path, output_path = Path(data_path), Path(output_path)
    if output_path.resolve() == data_path.resolve():
        raise ValueError(f"output {output_path} is the input file")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit}: must be > 0")
    records = read_records(data_path, limit)
    model, tokenizer = load_model(model_dir, adapter_dir)
    predictions = generate_texts(model, tokenizer, [r["input"] for r in records], max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, progress=progress)
    rows = [{"id": r.get("id"), "section": r.get("section"), "date": r.get("date"), "prediction": p,
             "reference": r.get("output")} for r, p in zip(records, predictions)]
    write_predictions(rows, output_path)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model dir (base model)")
    parser.add_argument("--adapter", help="PEFT adapter dir (adapter_config.json + weights) to apply")
    parser.add_argument("--data", required=True, help="prepared test.jsonl (fields input, output, id, date, section)")
    parser.add_argument("--output", required=True, help="predictions: .jsonl, or .txt for one line per prediction")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--limit", type=int, help="only the first N records")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per generate() call (left-padded)")
    args = parser.parse_args(argv)
    try:
        rows = generate(args.model, args.data, args.output, adapter_dir=args.adapter,
                        max_new_tokens=args.max_new_tokens, limit=args.limit, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(rows)} predictions to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
