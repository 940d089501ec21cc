"""The bundled tiny HunyuanVideo (assets/models/tiny-hunyuanvideo): procedural clips (`data`), the untrained
pipeline folder (`build`), training (`train`, on a GPU through `gpu_train.sh`), held-out adherence (`check`)
and CPU timing (`bench_cpu`); docs/tiny-video.md."""
