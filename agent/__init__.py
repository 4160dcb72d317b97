"""edge-agent: a dependable MQTT worker for a 4-bit GGUF LLM on small boards."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edge-agent")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"
