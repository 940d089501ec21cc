"""SpecDiff's partial steps as CUDA graph replays (`SpecDiffConfig.cuda_graphs`, `accel.runtime.CallGraph`), against
the same run without graphs: the same decisions, level counts and compute, the same outputs, graphs kept and
replayed by a second run, the plain pipeline again after `remove()`. Needs CUDA (skipped otherwise); the device
scripts (`bash scripts/bench/gpu_speca.sh`) run it on the GPU machine."""

import pytest
import torch

import accel
import tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def run(pipe, steps=12):
    return tiny.run(pipe, steps, size=128, device="cuda")


@pytest.mark.parametrize("cfg", [dict(cache_rate=0.75), dict(cache_rate=0.5, c3_mode="taylor", score_every=1),
                                 dict(cache_rate=0.75, text_tokens="cache")],
                         ids=["history", "taylor-every-layer", "text-cached"])
def test_graphs_match_eager(cuda_pipe, cfg):
    base = run(cuda_pipe)
    outs, traces = {}, {}
    for graphs in (False, True):
        with accel.apply(cuda_pipe, accel.SpecDiffConfig(cuda_graphs=graphs, warmup_steps=2, sync_timing=False,
                                                         **cfg)) as h:
            outs[graphs] = [run(cuda_pipe), run(cuda_pipe)]  # the second run replays graphs captured in the first
            traces[graphs] = h.traces[-2:]
            if graphs:
                assert cuda_pipe.transformer._diffusers_hook.get_hook("speclab_specdiff")._graphs
    for t_eager, t_graph in zip(traces[False], traces[True]):
        assert [r.decision for r in t_eager.steps] == [r.decision for r in t_graph.steps]
        assert [r.blocks_computed for r in t_eager.steps] == [r.blocks_computed for r in t_graph.steps]
        levels = lambda t: [tuple(r.extra.get(k) for k in ("c1", "c2", "c3")) for r in t.steps]  # noqa: E731
        assert levels(t_eager) == levels(t_graph)  # the importance from replayed scores ranks tokens the same
        assert [r.extra.get("score_pairs") for r in t_eager.steps] == [r.extra.get("score_pairs")
                                                                       for r in t_graph.steps]
    assert any(r.decision == "partial" for r in traces[True][0].steps)
    for a, b in zip(outs[False], outs[True]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert not torch.equal(outs[True][0], base)  # partial steps did run
    assert torch.equal(run(cuda_pipe), base)  # removed: the plain pipeline again
