"""The latency benchmark: a lean fake LLM, a Layercode-like load generator, and the figures the issue asks for.

Run it with `make bench` or `uv run python -m bench --help`; BENCHMARKS.md explains the method and holds the
latest results. Nothing here is imported by `layercode_agent`: the bench drives the real `layercode-agent serve`
from outside, as Layercode would.
"""
