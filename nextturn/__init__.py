"""nextturn: online learning middleware for LLM chat and agent traffic."""

__version__ = "0.1.0"
