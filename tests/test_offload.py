"""Methods on a pipeline with diffusers' model CPU offload (`enable_model_cpu_offload`, what the lab falls back to
when a folder does not fit the GPU: `lab.gpu.plan_placement`).

- On the CPU (accelerate's offload hooks with the CPU as the execution device: the same hook chain, moving
  nothing): every method of the contract on both families gives, bit for bit, what it gives without offload,
  and after `remove()` the plain pipeline's output again.
- On CUDA (skipped otherwise): the offload hooks move the transformer to the CPU after every pipeline call and back
  at the next, to new memory. CUDA graphs kept across runs (SpeCa's speculative steps, SpecDiff's partial steps)
  were recorded against the old addresses: the methods drop them when the weights moved
  (`StepDriverHook.weights_moved`), and a second run gives what it gives without offload. The old memory is
  filled with NaN between the runs, so replaying a stale graph shows.
"""

from __future__ import annotations

import os

import pytest
import torch

import accel
import tiny
from accel.runtime import storage_stamp
from families import FAMILIES
from scripts.bench.utils import fixed_schedule
from test_contract import METHODS, config_for


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def fam(request):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield request.param
    torch.set_num_threads(n)


@pytest.mark.parametrize("offload_first", [True, False], ids=["offload-then-apply", "apply-then-offload"])
@pytest.mark.parametrize("method", ["speca", "specdiff", "taylorseer", "fbcache"])
def test_methods_on_an_offloaded_pipeline_give_the_same_output(fam, method, offload_first):
    cfg = config_for(method, fam)
    pipe = fam.make_pipe(0)
    plain = fam.run(pipe)
    with accel.apply(pipe, cfg):
        ref = [fam.run(pipe), fam.run(pipe, seed=1)]
    off = fam.make_pipe(0)
    if offload_first:
        off.enable_model_cpu_offload(device="cpu")
    h = accel.apply(off, cfg)
    if not offload_first:
        off.enable_model_cpu_offload(device="cpu")
    # two calls: the offload hooks re-install themselves between them (and SpeCa / SpecDiff's model-level hook must
    # stay in the call path)
    got = [fam.run(off), fam.run(off, seed=1)]
    assert len(h.traces) == 2 or method in ("taylorseer", "fbcache")
    h.remove()
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert not torch.equal(got[0], plain)
    assert torch.equal(fam.run(off), plain)  # removed: the plain pipeline, still offloaded
    assert hasattr(off.transformer, "_hf_hook")


def test_storage_stamp_changes_when_weights_move_not_when_values_change():
    lin = torch.nn.Linear(4, 4)
    stamp = storage_stamp(lin)
    with torch.no_grad():
        lin.weight.add_(1.0)
    assert storage_stamp(lin) == stamp
    lin.to(torch.float64)
    assert storage_stamp(lin) != stamp


def test_weights_moved_is_checked_once_per_run():
    pipe = tiny.tiny_flux_pipe()
    with accel.apply(pipe, accel.SpeCaConfig(schedule=fixed_schedule(8, 3))) as h:
        hook = pipe.transformer._diffusers_hook.get_hook("speclab_speca")
        tiny.run(pipe, 8)
        assert hook.weights_moved() is False  # between runs: stamped now, nothing to compare with
        pipe.transformer.to(torch.float64).to(torch.float32)  # new storage, same values
        assert hook.weights_moved() is True
        assert hook.weights_moved() is False
        out = tiny.run(pipe, 8)
    assert h.trace.summary()["accepted_steps"] > 0
    assert torch.isfinite(out).all()


# ---- CUDA: graphs kept across runs are dropped when the offload hooks moved the weights --------------------------
def _poison_freed_weight_memory(pipe) -> list:
    """While the offloaded transformer sits on the CPU, take the GPU memory its weights had (same sizes, same
    order: the caching allocator hands the freed blocks back) and fill it with NaN; the next call moves the
    weights elsewhere. Keep the returned tensors alive until the run is over."""
    assert next(pipe.transformer.parameters()).device.type == "cpu"
    return [torch.full(p.shape, float("nan"), dtype=p.dtype, device="cuda") for p in pipe.transformer.parameters()]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cfg", [accel.SpeCaConfig(schedule=fixed_schedule(14, 4), sync_timing=False),
                                 accel.SpecDiffConfig(cache_rate=0.75, warmup_steps=2, sync_timing=False)],
                         ids=["speca", "specdiff"])
def test_cuda_graphs_are_recaptured_after_the_offload_moved_the_weights(cfg):
    def run(p, seed):
        return tiny.run(p, 14, seed=seed, size=128, device="cuda")

    on_gpu = tiny.tiny_flux_pipe(device="cuda")
    with accel.apply(on_gpu, cfg):
        ref = [run(on_gpu, 0), run(on_gpu, 1)]
    off = tiny.tiny_flux_pipe(device="cuda")
    off.enable_model_cpu_offload()
    with accel.apply(off, cfg) as h:
        hook = off.transformer._diffusers_hook.get_hook(f"speclab_{h.method}")
        first = run(off, 0)
        graphs = dict(hook._graphs)
        assert graphs  # captured in the first run
        poison = _poison_freed_weight_memory(off)
        second = run(off, 1)
        del poison
        assert hook._graphs and all(hook._graphs.get(k) is not g for k, g in graphs.items())  # captured again
    torch.testing.assert_close(first, ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second, ref[1], rtol=1e-4, atol=1e-5)


# ---- CUDA: the lab on a folder it offloads (lab.models._place with SPECLAB_OFFLOAD=1) ----------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_lab_runs_methods_twice_on_an_offloaded_folder(monkeypatch):
    import numpy as np

    from lab import methods as LM
    from lab import models as M
    from lab import runner as R

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "models", "tiny-flux")
    preset = M.folder_preset(folder, gpu=True)
    pictures = {}
    for offload in ("0", "1"):
        monkeypatch.setenv("SPECLAB_OFFLOAD", offload)
        pipe = M.load_preset(preset)
        assert pipe._speclab_placement.mode == ("offload" if offload == "1" else "gpu")
        assert hasattr(pipe.transformer, "_hf_hook") == (offload == "1")
        model = M.LoadedModel(preset, pipe)
        spec = R.RunSpec(preset.name, "a red circle", 0, 12, 256, 256, preset.guidance)
        for label in (LM.SPECA, LM.SPECDIFF):
            for run in range(2):  # the second run: the offload hooks re-installed themselves in between
                ups = list(R.stream_run(model, spec, LM.by_label(label).build({}), every_s=0.0))
                assert ups[-1].done and ups[-1].trace.summary()["full_steps"] < 12
                pictures[offload, label, run] = np.asarray(ups[-1].result.image, dtype=np.float32)
        del model, pipe
        torch.cuda.empty_cache()
    for label in (LM.SPECA, LM.SPECDIFF):
        for run in range(2):
            a, b = pictures["0", label, run], pictures["1", label, run]
            assert np.abs(a - b).mean() < 0.5, (label, run)  # 8-bit pixels; the same kernels either way
