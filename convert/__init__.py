"""Checkpoint conversion and export: HF <-> NeMo 2 layouts, NeMo LoRA -> HF PEFT, NIM layouts.

Format maths (QKV interleave, fc1 = [gate; up]) lives in ``families.layout`` as pure functions;
the PEFT adapter format is owned by ``convert.adapters``; NeMo 2 checkpoint reading by
``convert.nemo_ckpt``. Commands are thin: ``python -m convert.<command> --help``; a converter's
``main()`` ends with :func:`run_json_command` (``recipes.cli.run_command``: the report as one JSON
line, exit 0, or ``error: ...`` naming the file/tensor on stderr, exit 1).
"""
from recipes.cli import run_command as run_json_command

__all__ = ["run_json_command"]  # used by convert.hf_to_nemo and convert.nemo_to_hf
