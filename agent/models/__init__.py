"""GGUF models: where they may live, reading their headers, writing synthetic ones."""
