"""Benchmarks: BLEU scoring, training/inference speed, metrics files and reports (`python -m benchmarks.<command> --help`)."""
