"""Helpers shared by the tests: the CLI as a subprocess, worker processes, a farm, JSONL reading."""
