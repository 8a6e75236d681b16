"""harbord: one Ollama endpoint in front of a GPU and a CPU backend."""

__version__ = "0.1.0"
