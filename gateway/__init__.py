"""The gateway: an OpenAI-compatible proxy that records every turn (built in the Gateway issue)."""
