"""Discover, sample, register and publish a run: everything before the broker."""
