"""Fixtures that write synthetic GGUF models (owner: models)."""
