"""SpeCa's speculative steps as CUDA graph replays (`SpeCaConfig.cuda_graphs`), against the same run without
graphs: the same decisions and compute, outputs equal up to the rounding of the coefficient path, graphs kept
and replayed (not captured again) by a second run, nothing left after `remove()`. Needs CUDA (skipped otherwise:
the graphs are a CUDA feature); `bash scripts/gpu_kernel_tests.sh` runs it on the GPU machine."""

import pytest
import torch

import accel
import tiny
from scripts.bench.utils import fixed_schedule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def run(pipe, steps=14):
    return tiny.run(pipe, steps, size=64, device="cuda")


@pytest.mark.parametrize("cfg", [
    dict(schedule=fixed_schedule(14, 4)),
    dict(threshold=0.5, metric="rel_l2"),  # adaptive: decisions read the error of every judged step
    dict(schedule=fixed_schedule(14, 4), verify_in_grace=False, verify_output="forecast", order=2),
    dict(schedule=fixed_schedule(14, 4), forecast="stack"),  # the default is the output forecast
], ids=["schedule", "adaptive", "forecast-output-o2", "stack"])
def test_graphs_match_eager(cuda_pipe, cfg):
    base = run(cuda_pipe)
    outs, traces = {}, {}
    for graphs in (False, True):
        with accel.apply(cuda_pipe, accel.SpeCaConfig(cuda_graphs=graphs, sync_timing=False, **cfg)) as h:
            outs[graphs] = [run(cuda_pipe), run(cuda_pipe)]
            traces[graphs] = h.traces[-2:]
    for t_eager, t_graph in zip(traces[False], traces[True]):
        assert [r.decision for r in t_eager.steps] == [r.decision for r in t_graph.steps]
        assert [r.blocks_computed for r in t_eager.steps] == [r.blocks_computed for r in t_graph.steps]
        for a, b in zip(t_eager.steps, t_graph.steps):
            assert (a.error is None) == (b.error is None)
            if a.error is not None:
                assert b.error == pytest.approx(a.error, rel=1e-3, abs=1e-6)
    for a, b in zip(outs[False], outs[True]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert not torch.equal(outs[True][0], base)  # speculative steps did run
    assert torch.equal(run(cuda_pipe), base)  # removed: the plain pipeline again


def test_second_run_replays_without_capturing(cuda_pipe):
    cfg = accel.SpeCaConfig(schedule=fixed_schedule(14, 4), sync_timing=False)
    with accel.apply(cuda_pipe, cfg):
        hook = cuda_pipe.transformer._diffusers_hook.get_hook("speclab_speca")
        first = run(cuda_pipe)
        graphs = dict(hook._graphs)
        assert graphs  # captured during the first run (each key's second call)
        second = run(cuda_pipe)
        assert hook._graphs == graphs  # the same graph objects: replayed, none captured again
        assert torch.equal(first, second)
