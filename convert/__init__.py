"""Checkpoint conversion and export: HF <-> NeMo 2 layouts, NeMo LoRA -> HF PEFT, NIM layouts.

Format maths (QKV interleave, fc1 = [gate; up]) lives in ``convert.layout`` as pure functions;
the PEFT adapter format is owned by ``convert.adapters``; NeMo 2 checkpoint reading by
``convert.nemo_ckpt``. Commands are thin: ``python -m convert.<command> --help``.
"""


def run_json_command(call, errors: tuple[type[BaseException], ...]) -> int:
    """The tail of a converter's ``main()``: run ``call``, print its report as one JSON line and return 0,
    or print ``error: ...`` (the message names the file/tensor) to stderr and return 1."""
    import json
    import sys
    try:
        report = call()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0
