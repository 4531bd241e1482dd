"""Scorer `latency`: predicted time to first token (`scorer`), from an online per-endpoint model (`model`)."""
