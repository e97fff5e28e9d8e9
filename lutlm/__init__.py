"""lutlm: low-bit LLM inference by table lookup."""

__version__ = "0.1.0"
