"""The bundled tiny FLUX (assets/models/tiny-flux): procedural data (`data`), the untrained pipeline folder
(`build`), training (`train`), prompt adherence (`check`) and CPU timing (`bench_cpu`); docs/tiny-flux.md."""
