"""SpecLab's command-line tools, run as modules from the repository root (`python -m scripts.bench.speca`).

`bench/` benchmarks (and what they share: `bench.utils`, `bench.pipes`); `tiny_flux/` and `tiny_video/` make the
bundled tiny models (data, build, train, check, CPU timing); the shell entry points (`setup_env.sh`, `start.sh`,
`test.sh`) stay here. docs/architecture.md has the layout.
"""
