"""Recipes: config loading, data preparation, model presets and the two training backends
(NeMo 2 and the Hugging Face baseline). Commands: `python -m recipes.<command> --help`."""
