"""The gateway: an OpenAI-compatible server that records every turn (docs/gateway.md)."""
