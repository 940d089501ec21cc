"""Benchmarks of SpeCa, SpecDiff and diffusers' TaylorSeerCache; each module is a command
(`python -m scripts.bench.speca --help`). `utils` and `pipes` are what they share."""
