"""Prefix-cache affinity: the scorer (`scorer`) and the approximate index it owns and teaches (`index`)."""
