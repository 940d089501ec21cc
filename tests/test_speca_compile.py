"""SpeCa under `compile_repeated_blocks`: no recompilation storm, later calls reuse the graphs, same outputs.

Dynamo's "eager" backend traces and guards exactly as inductor does but skips code generation, so graph and
recompile counts are the real ones at a CPU test's cost (a few seconds on the tiny FLUX).
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import accel
from tiny import run, tiny_flux_pipe

STEPS = 8
# Graphs a compiled tiny FLUX (2 double + 3 single blocks) gets beyond the plain ones: stack, the verify block
# with its tap; per_block, a double and a single block with taps.
EXTRA_GRAPHS = {"stack": 1, "per_block": 2}


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("forecast", ["stack", "per_block"])
def test_compiled_speca_compiles_once_and_matches_eager(fresh_dynamo, forecast):
    pipe = tiny_flux_pipe()
    cfg = accel.SpeCaConfig(threshold=1e9, min_spec_steps=1, forecast=forecast)
    plain_eager = run(pipe, STEPS)
    with accel.apply(pipe, cfg):
        speca_eager = run(pipe, STEPS)

    pipe.transformer.compile_repeated_blocks(backend="eager")
    assert torch.equal(run(pipe, STEPS), plain_eager)
    plain_graphs = graphs()
    with accel.apply(pipe, cfg) as handle:
        first = run(pipe, STEPS)
        after_first = graphs()
        second = run(pipe, STEPS)
        assert graphs() == after_first  # the second call compiles nothing
    assert handle.trace.summary()["accepted_steps"] > 0
    # the tapped blocks compiled (so SpeCa's blocks run compiled), and nothing more
    assert 1 <= after_first - plain_graphs <= EXTRA_GRAPHS[forecast]
    assert torch.equal(first, speca_eager) and torch.equal(second, speca_eager)
    assert not counters["graph_break"]
    # removed: the plain graphs serve again, nothing new compiled
    assert torch.equal(run(pipe, STEPS), plain_eager)
    assert graphs() == after_first


def test_whole_model_compile_runs_the_accelerated_transformer_eagerly(fresh_dynamo):
    """Under `torch.compile` of the whole transformer the model-level hook (threading, clocks, the trace) is kept
    out of the graph: the accelerated call runs eagerly and gives the eager result (regional compilation is the
    way to compile SpeCa's blocks)."""
    pipe = tiny_flux_pipe()
    cfg = accel.SpeCaConfig(threshold=1e9, min_spec_steps=1)
    with accel.apply(pipe, cfg):
        eager = run(pipe, STEPS)
    pipe.transformer.compile(backend="eager")
    with accel.apply(pipe, cfg) as handle:
        assert torch.equal(run(pipe, STEPS), eager)
    assert handle.trace.summary()["accepted_steps"] > 0
