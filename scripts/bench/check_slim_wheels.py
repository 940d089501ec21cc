"""Check that the slim wheels (scripts/bench/slim_wheels.sh) carry the lab: with them installed in a folder that
comes first on the path, serve the lab headless on the bundled tiny FLUX, call `/generate` through
`gradio_client`, and list every module the process loaded from outside that folder and the standard library
whose distribution is not in the device image's list (KINDS.md): those would be missing on the device.

    PYVER=3.11 DEST=/tmp/whl311 bash scripts/bench/slim_wheels.sh
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site311 /tmp/whl311/*.whl
    PYTHONPATH=/tmp/site311 HF_HUB_OFFLINE=1 .venv/bin/python -m scripts.bench.check_slim_wheels /tmp/site311
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
import sysconfig
import time

DEVICE_IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split()


LOCAL_ONLY = {"httpx2", "httpcore2", "truststore"}
"""What this machine's huggingface_hub 2.x imports; the device's huggingface_hub 1.33 uses httpx (in its image)."""


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def main() -> None:
    site = os.path.abspath(sys.argv[1])
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    import diffusers
    import plotly

    for mod in (gr, diffusers, plotly):
        assert mod.__file__.startswith(site), f"{mod.__name__} comes from {mod.__file__}, not {site}"
    import app
    from gradio_client import Client

    demo = app.build_app(app.Lab())
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name="127.0.0.1", server_port=7871, prevent_thread_lock=True, show_error=False)
    t0 = time.perf_counter()
    client = Client("http://127.0.0.1:7871/", verbose=False)
    job = client.submit(prompt=app.EXAMPLES[0], method="SpeCa", steps=8, compare=True, api_name="/generate")
    updates = list(job)
    summary = updates[-1][app.OUTPUTS.index("summary")]
    assert "SpeCa" in summary and "step 8/8" in summary, summary
    print(f"/generate through gradio_client: {len(updates)} updates in {time.perf_counter() - t0:.1f} s")
    demo.close()

    device = {_norm(n) for n in DEVICE_IMAGE}
    stdlib = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}
    dists = md.packages_distributions()
    missing = {}
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None) or ""
        if not path or path.startswith(site) or any(path.startswith(p + os.sep) and "site-packages" not in path
                                                    for p in stdlib):
            continue
        if "site-packages" not in path:
            continue  # this repository's own modules
        for dist in dists.get(name.split(".")[0], []):  # a module of no distribution: a compiled helper
            if _norm(dist) not in device and _norm(dist) not in LOCAL_ONLY:
                missing.setdefault(_norm(dist), name)
    if missing:
        print("loaded from outside the slim set and not in the device image:", missing)
        raise SystemExit(1)
    print(f"every module came from {site}, the standard library or the device image's packages")


if __name__ == "__main__":
    main()
