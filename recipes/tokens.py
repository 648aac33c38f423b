"""Tokenisation of one prompt->completion pair, shared by the HF backend and data statistics.

It mirrors what NeMo 2.1's GPTSFTDataset does with a FineTuningDataModule record
{"input": prompt, "output": completion} and prompt_template "{input}{output}": the prompt and the
completion are tokenised separately without special tokens, EOS is appended, the loss is on the
completion (and EOS) only, and an over-long example is cut from the end of the prompt ("input"
field, truncation_method "right") so that the answer survives. Both backends therefore see the same
token ids for the same record.
"""
from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100  # label value that torch's cross-entropy ignores
# GPTSFTDataset settings (NeMo 2.1's, and Megatron-Bridge's copy of it) that make it build exactly the token
# ids of tokenize_pair: "input" already ends with the chat template's assistant header, so no space between
# the fields.
SFT_DATASET_KWARGS = {"prompt_template": "{input}{output}", "label_key": "output", "truncation_field": "input",
                      "truncation_method": "right", "add_bos": False, "add_eos": True, "add_sep": False,
                      "answer_only_loss": True}


@dataclass(frozen=True)
class TokenizedPair:
    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int  # after truncation
    completion_tokens: int  # including EOS
    truncated: bool


def tokenize_pair(tokenizer, prompt: str, completion: str, seq_length: int) -> TokenizedPair:
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token")
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return pair_from_ids(p, c, tokenizer.eos_token_id, seq_length)


def tokenize_pairs(tokenizer, prompts: list[str], completions: list[str], seq_length: int) -> list[TokenizedPair]:
    """:func:`tokenize_pair` for many pairs with two batch calls of the tokenizer (a fast tokenizer
    encodes a batch in Rust): the same ids as one call per text."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token")
    if not prompts:
        return []
    ps = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    cs = tokenizer(completions, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id  # a property lookup through the tokenizer's __getattr__: once
    return [pair_from_ids(p, c, eos, seq_length) for p, c in zip(ps, cs)]


def pair_from_ids(p: list[int], completion_ids: list[int], eos_id: int, seq_length: int) -> TokenizedPair:
    """The pair of prompt ids ``p`` and completion ids (EOS appended here), cut as GPTSFTDataset cuts it."""
    c = list(completion_ids) + [eos_id]
    truncated = len(p) + len(c) > seq_length
    if truncated:
        keep = max(seq_length - len(c), 0)
        p = p[:keep]
        c = c[: seq_length - len(p)]
    return TokenizedPair(input_ids=p + c, labels=[IGNORE_INDEX] * len(p) + c,
                         prompt_tokens=len(p), completion_tokens=len(c), truncated=truncated)


def sft_batch_counts(tokens, loss_mask) -> dict[str, int]:
    """metrics.jsonl counts for one GPTSFTDataset micro-batch (NeMo 2.1 after gpt_data_step; Megatron-Bridge's
    copy of the dataset collates the same way).

    GPTSFTDataset.collate_fn shifts the sequence: ``tokens = ids[:-1]``, ``loss_mask = mask[1:]``, and
    pads ``tokens`` with the EOS id (so padding cannot be told from a real EOS by value). The loss
    covers the answer and its EOS, the last real token, whose label sits at index ``len(ids) - 2``:
    a row's unpadded length ``len(ids)`` (what the HF backend counts, ``len(tokenize_pair(...).input_ids)``)
    is therefore its last loss position + 2. A row without loss tokens (cannot happen with
    answer_only_loss and add_eos) would count 0.
    """
    import torch
    lm = loss_mask.bool()
    b, s = lm.shape
    pos = torch.arange(s).expand(b, s)
    last = torch.where(lm, pos, torch.full_like(pos, -2)).max(dim=1).values
    return {"tokens": int((last + 2).sum()), "tokens_padded": int(tokens.numel()),
            "loss_tokens": int(lm.sum()), "samples": int(b)}
