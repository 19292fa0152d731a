"""Signals: turns joined with what happened next, made into rewards and hints (built in the Signals issue)."""
