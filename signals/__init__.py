"""Signals: turns joined with what happened next, made into rewards and hints (docs/signals.md)."""
