"""Checkpoint conversion and export: HF <-> NeMo 2 layouts, NeMo LoRA -> HF PEFT, NIM layouts.

Format maths (QKV interleave, fc1 = [gate; up]) lives in ``convert.layout`` as pure functions;
the PEFT adapter format is owned by ``convert.adapters``; NeMo 2 checkpoint reading by
``convert.nemo_ckpt``. Commands are thin: ``python -m convert.<command> --help``.
"""
