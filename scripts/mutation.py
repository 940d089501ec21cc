"""Mutation testing of the decision and maths code (issue 17), with a time budget; not part of CI.

    python -m scripts.mutation [--budget-minutes 60] [--max-children 2] [--keep] [NAME_OR_GLOB ...]
    python -m scripts.mutation --rerun [NAME_OR_GLOB ...]   # what the last run did not kill, and changed functions

Runs mutmut (a test-only tool: installed into the running interpreter, `pip install mutmut==3.8.1`, when
missing) with the `[tool.mutmut]` settings of pyproject.toml: mutmut mutates whole files, this script runs only
the mutants of the functions in SCOPE (or the names / globs given, e.g. the survivors of an earlier run). At the
budget mutmut is interrupted; the mutants it has not reached count as "not checked". Prints, over the scope:
mutants total, killed, survived, timeout, no tests, not checked, the score ((killed + timeout) / checked) and the
score with the survivors listed in EQUIVALENT counted apart (those in EXPLAINED stay in the score as survivors;
docs/testing.md, "Mutation testing", explains each). Writes out/mutation/results.json (every mutant's status, the
hash of every function's code, for --rerun), out/mutation/summary.json, out/mutation/survivors.txt (every
survivor's diff, tagged equivalent / explained / UNEXPLAINED) and out/mutation/mutmut.log, then removes mutants/
(unless --keep). Exit status: 0 if the score without the equivalent mutants reaches
--target (default 90 %), 1 if it does not, 2 if the budget ran out first, 3 if mutmut failed (e.g. a test failed on
the unmutated tree).
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "mutation"
MUTMUT_VERSION = "3.8.1"

# The decision / maths functions, as mutmut mutant-name globs (module.x_function or module.xǁClassǁmethod).
_S = "ǁ"
SCOPE = [
    # Taylor forecast (the whole file) and the torch maths of kernels.py: the fallbacks, the stack forecast's sum,
    # the verification's forecast and its sums-to-errors step (the dispatchers, whose other branch is Triton on
    # CUDA, are left out: on the CPU that branch never runs; scripts/gpu_kernel_tests.sh compares the kernels)
    "accel.taylor.*",
    "accel.kernels.x_torch_accumulate__mutmut_*",
    "accel.kernels.x_add_terms__mutmut_*",
    "accel.kernels.x_torch_taylor_update__mutmut_*",
    "accel.kernels.x_torch_forecast__mutmut_*",
    "accel.kernels.x_errors_from_sums__mutmut_*",
    # SpecDiff's importance, its "history" and "future" terms: the attention each image token receives (the torch
    # fallbacks of the score kernels, the sum over scored layers; `attention_received`, which divides the sums by
    # heads x scored queries, is decorated (@torch.no_grad) and mutmut leaves decorated functions alone)
    "accel.kernels.x_torch_row_logsumexp__mutmut_*",
    "accel.kernels.x_torch_column_sums__mutmut_*",
    f"accel.adapters.kv_attention.x{_S}AttnControl{_S}scores_layer__mutmut_*",
    f"accel.adapters.kv_attention.x{_S}AttnControl{_S}add_scores__mutmut_*",
    # verification metrics (the whole file), the lab's image metrics
    "accel.metrics.*",
    "lab.compare.x__batch__mutmut_*",
    "lab.compare.x__same_shape__mutmut_*",
    "lab.compare.x_psnr__mutmut_*",
    "lab.compare.x_ssim__mutmut_*",
    # SpeCa: threshold schedule, step plan and verdict, the errors read into the trace, verification, the
    # forecasts (stack: recorded streams and their differences; per block: gates, contributions)
    f"accel.speca.x{_S}SpeCaConfig{_S}threshold_at__mutmut_*",
    "accel.speca.x__read_errors__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}_plan__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}_full__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}run_step__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}_spec_block__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}_forecaster__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}_full_per_block__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}_full_stack_block__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}_update_stack__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}_entries__mutmut_*",
    f"accel.speca.x{_S}SpeCaModelHook{_S}all_gates__mutmut_*",
    # SpecDiff: C1 size, levels, scores, C3 weights (both modes), schedule, full / partial steps (importance,
    # levels, assembly), the speculative pre-run, the level counts and maps written into the trace
    f"accel.specdiff.x{_S}SpecDiffConfig{_S}n_computed__mutmut_*",
    "accel.specdiff.x_history_weights__mutmut_*",
    "accel.specdiff.x_taylor_weights__mutmut_*",
    "accel.specdiff.x_normalise_scores__mutmut_*",
    "accel.specdiff.x_assign_levels__mutmut_*",
    f"accel.specdiff.x{_S}SpecDiffModelHook{_S}_scheduled_partial__mutmut_*",
    f"accel.specdiff.x{_S}SpecDiffModelHook{_S}_plan__mutmut_*",
    f"accel.specdiff.x{_S}SpecDiffModelHook{_S}run_step__mutmut_*",
    f"accel.specdiff.x{_S}SpecDiffModelHook{_S}_after_full__mutmut_*",
    f"accel.specdiff.x{_S}SpecDiffModelHook{_S}_partial_step__mutmut_*",
    f"accel.specdiff.x{_S}SpecDiffModelHook{_S}_prerun__mutmut_*",
    f"accel.specdiff.x{_S}SpecDiffModelHook{_S}_fill__mutmut_*",
]

# Survivors that cannot change behaviour, as (mutant-name glob of the function, the mutated line as mutmut
# shows it, whitespace-normalised; or "- " + the original line: every mutant of that line). Mutant numbers move
# when a file changes; the lines do not. docs/testing.md ("Mutation testing") explains each group; the score
# leaves these out.
_SD, _SC = f"accel.specdiff.x{_S}SpecDiffModelHook{_S}", f"accel.speca.x{_S}SpeCaModelHook{_S}"
EQUIVALENT: list[tuple[str, str]] = [
    # the same value spelled another way: numpy's astype(None) is float64, float("INF") is inf, "-INF" is -inf,
    # a falsy None for False, transpose(-1, +2) of a 4-d tensor is transpose(-1, -2), torch.cat's default dim is 0,
    # einsum takes upper-case subscripts, mean over all dims of a 1-d tensor is the mean over dim 0, and a [W, N]
    # tensor divided by [N] broadcasts as by [1, N]
    ("lab.compare.x__batch__mutmut_*", "return torch.from_numpy(a.astype(None)).permute(2, 0, 1)[None]"),
    ("lab.compare.x_psnr__mutmut_*", 'return float("INF")'),
    ("lab.compare.x_ssim__mutmut_*", "return float(structural_similarity_index_measure(x, y, data_range=data_range, "
                                     "gaussian_kernel=None,"),
    ("accel.kernels.x_torch_row_logsumexp__mutmut_*", "kt = key.transpose(1, 2).transpose(-1, +2) # B H D Sk"),
    ("accel.kernels.x_torch_row_logsumexp__mutmut_*",
     'logits = logits.masked_fill(~key_mask.bool()[:, None, None, :], float("-INF"))'),
    ("accel.kernels.x_errors_from_sums__mutmut_*", "err = err.mean(dim=None, keepdim=True)"),
    ("accel.specdiff.x_history_weights__mutmut_*", "return w / w.sum(0, ).clamp_min(_TINY)"),
    ("accel.specdiff.x_history_weights__mutmut_*", "return w / w.sum(0, keepdim=False).clamp_min(_TINY)"),
    (_SD + "_partial_step__mutmut_*", 'weighted = torch.einsum("WN,WBNC->BNC", w, hist.float()).to(hist.dtype)'),
    (_SD + "_partial_step__mutmut_*",
     "hist.index_copy_(2, c1, torch.cat([new.to(hist.dtype).unsqueeze(0), sub[:-1]], ))"),
    (_SD + "_partial_step__mutmut_*", "state.hist_pos.index_copy_(1, c1, torch.cat([pos.new_full((1, n_c1), "
                                      "float(info.step)), pos[:-1]], ))"),
    # more spellings: dim=+1 of a [B, N] tensor is dim=-1, upper-case einsum subscripts, transpose(-1, +2)
    ("accel.specdiff.x_normalise_scores__mutmut_*",
     "return (s / s.mean(dim=+1, keepdim=True).clamp_min(_TINY)).mean(dim=0)"),
    ("accel.kernels.x_torch_column_sums__mutmut_*", 'acc += torch.einsum("BHQK,BQ->BK", p, w[:, s:s + chunk])'),
    ("accel.kernels.x_torch_column_sums__mutmut_*",
     "kt = key[:, key_start:key_start + n_keys].transpose(1, 2).transpose(-1, +2) # B H D n"),
    ("accel.kernels.x_torch_column_sums__mutmut_*", "def torch_column_sums(query, key, lse, scale, key_start, n_keys, "
                                                   "query_weight=None, query_stride=1, chunk=1025):"),
    # the gate input already has the gate weights' dtype (both the model's); the assembled sample already has the
    # model output's dtype (the history is kept in it)
    (_SC + "all_gates__mutmut_*", "x = self.adapter.gate_input(temb).to(None)"),
    (_SD + "_partial_step__mutmut_*",
     "return adapter.with_output_sample(out, adapter.tokens_sample(full.to(None), layout))"),
    # kv_ready is True whenever a partial step is scheduled and the history exists: the full step before it
    # stored K/V because the same schedule said the next step is partial (a defensive check)
    (_SD + "_plan__mutmut_*", "if state.his is None or state.fut is None or state.hist is None and not "
                              "state.kv_ready:"),
    # x * 1.0 instead of x (torch_forecast), p - r instead of in place (a copy, the same values), cosine
    # similarity's default dim=1, mean over all dims of a 1-d tensor
    ("accel.kernels.x_torch_forecast__mutmut_*",
     "p = terms[0] if (coefs[0] == 1.0) and False else terms[0] * coefs[0]"),
    ("accel.metrics.x_verification_errors__mutmut_*", "diff = p.sub_(r) if (p is not pred) and False else p - r # p is "
                                                      "a fresh copy unless pred was already float32"),
    ("accel.metrics.x_verification_errors__mutmut_*", "err = 1.0 - torch.nn.functional.cosine_similarity("
                                                      "pred.float().flatten(1), r.flatten(1), eps=eps)"),
    ("accel.metrics.x_verification_errors__mutmut_*", "err = err.mean(dim=None, keepdim=True)"),
    # SpeCa: a speculative step's reason from _plan is replaced by its verdict's; blocks_computed is 0 when a
    # speculative step computes its verify block (reset per step); every adapter's block_output ignores the block
    # it is given, as output_streams does; coefficients are only asked of a forecaster that has a node (predict
    # and every SpeCa step check that first)
    (_SC + "_plan__mutmut_*", 'return False, "XXXX"'),
    (_SC + "_spec_block__mutmut_*", "state.blocks_computed = 1"),
    (_SC + "_spec_block__mutmut_*", "streams = adapter.output_streams(None, out)"),
    (_SC + "_spec_block__mutmut_*", "return adapter.block_output(None, streams)"),
    (f"accel.taylor.x{_S}TaylorForecaster{_S}coefficients__mutmut_*",
     "m = len(self.nodes) - 1 if (self.nodes) or True else 0"),
    (f"accel.taylor.x{_S}TaylorForecaster{_S}coefficients__mutmut_*", "m = len(self.nodes) - 1 if self.nodes else 1"),
    # SpeCa state set to a falsy None for False; FLUX's transformer called with keywords only; a speculative step's
    # consecutive_spec is None only after a deferred rejection, and the next step is full before it is compared;
    # one running trace per call (its id as the key, or id(None)); an extra refresh of the trace's series; Taylor
    # nodes kept one beyond the order (coefficients use order + 1 at most)
    (_SC + "_full__mutmut_*", "state.force_full_next = None"),
    (_SC + "_full__mutmut_*", "out = self.fn_ref.original_forward(**kwargs)"),
    (_SC + "run_step__mutmut_*", "out = self.fn_ref.original_forward(**kwargs)"),
    (_SC + "run_step__mutmut_*", "state.last_full = None"),
    (_SC + "run_step__mutmut_*", "state.consecutive_spec = None"),
    (_SC + "run_step__mutmut_*", "_read_errors([entry], appended=None) # the decision (or a viewer) needs it now: "
                                 "one host sync"),
    (_SC + "run_step__mutmut_*", "_read_errors([entry], ) # the decision (or a viewer) needs it now: one host sync"),
    (_SC + "run_step__mutmut_*", "_read_errors([entry], appended=True) # the decision (or a viewer) needs it now: "
                                 "one host sync"),
    ("accel.speca.x__read_errors__mutmut_*", "traces[id(None)] = trace"),
    ("accel.speca.x__read_errors__mutmut_*", "if appended or trace is not None:"),
    (f"accel.taylor.x{_S}TaylorForecaster{_S}update__mutmut_*", "self.nodes = ([x] + old_nodes)[: self.order + 2]"),
    (f"accel.taylor.x{_S}TaylorForecaster{_S}update__mutmut_*",  # with no dtype: f.to(None), a no-op
     "if self.dtype is not None or f.dtype != self.dtype:"),
    # topk sorted or not: C1's indices are sorted right after
    ("accel.specdiff.x_assign_levels__mutmut_*", "c1 = torch.topk(score, n_c1, ).indices.sort().values"),
    ("accel.specdiff.x_assign_levels__mutmut_*", "c1 = torch.topk(score, n_c1, sorted=True).indices.sort().values"),
    # ssim: below the window, side - 1 + side % 2 and side - 2 + side % 2 give the same kernel_size (win // 2 * 2 - 1)
    ("lab.compare.x_ssim__mutmut_*", "win = side - 2 + side % 2 # smaller than the window: a uniform odd window "
                                     "that fits (its padding included)"),
    # a chunk size of the torch fallback: the rows are independent, any chunking gives the same values
    ("accel.kernels.x_torch_row_logsumexp__mutmut_*",
     "def torch_row_logsumexp(query, key, scale, key_mask=None, query_stride=1, chunk=1025):"),
    # a conversion to the dtype the tensor already has (the history is kept in the model's output dtype; the
    # stack forecast's growth with no cache_dtype), or a copy instead of an alias (x * 1.0)
    (_SD + "_partial_step__mutmut_*", "full.index_copy_(1, c1, new.to(None))"),
    (_SD + "_partial_step__mutmut_*",
     "hist.index_copy_(2, c1, torch.cat([new.to(None).unsqueeze(0), sub[:-1]], dim=0))"),
    (_SC + "_update_stack__mutmut_*",
     'feats[f"{name}.{s}"] = x.to(dtype) - y.to(dtype) if (dtype is not None) or True else x - y'),
    (f"accel.taylor.x{_S}Forecast{_S}__getitem____mutmut_*",
     "p = terms[0] if (self.coefs[0] == 1.0) and False else terms[0] * self.coefs[0]"),
    # a float32 weight's Lagrange factor built in torch's default dtype (float32; with float64 it is only more
    # exact, and the weights stay float32)
    ("accel.specdiff.x_taylor_weights__mutmut_*", "li = torch.ones(n, dtype=None, device=positions.device)"),
    ("accel.specdiff.x_taylor_weights__mutmut_*", "li = torch.ones(n, device=positions.device)"),
    # the C3 mix rounded to the model dtype once at the end instead of first: the same single rounding
    (_SD + "_partial_step__mutmut_*", 'weighted = torch.einsum("wn,wbnc->bnc", w, hist.float()).to(None)'),
    # store_kv is read only outside SUBSET calls (kv_attention.attend): a partial step writes its C1 rows anyway
    (_SD + "_partial_step__mutmut_*", "- ctl.begin(AttnMode.SUBSET, state.kv, store_kv=False, score=next_partial, "
                                      "rows=rows,"),
    # every adapter's output_streams ignores the block (DualStreamAdapter: dict(zip(output_order, output)))
    (_SC + "_full_stack_block__mutmut_*", 'rec["verify_out"] = adapter.output_streams(None, out)'),
    (_SC + "_full_stack_block__mutmut_*", 'rec["last_out"] = adapter.output_streams(None, out)'),
    # FLUX, the one family that hoists its modulation, calls the transformer with keyword arguments only
    (_SD + "_partial_step__mutmut_*", "ctl.modulation = self._modulation(None, kwargs, info, state)"),
    # the pre-run: FLUX and HunyuanVideo pipelines call the transformer with keyword arguments only (no args to
    # read latents or timestep from, or to pass on); the Euler step after the last pre-run call (x then unused);
    # a pick past the last one (never read); StepRecord's default decision is FULL; every flow-matching
    # scheduler has num_train_timesteps (1000 in the tests' one)
    (_SD + "_prerun__mutmut_*", "x = adapter.call_latents(None, kwargs)"),
    (_SD + "_prerun__mutmut_*", "timestep=adapter.model_timestep(s, sched, None, kwargs))"),
    (_SD + "_prerun__mutmut_*", "v = adapter.output_sample(self.fn_ref.original_forward(**k))"),
    (_SD + "_prerun__mutmut_*", "if j - 1 < cfg.spec_steps:"),
    (_SD + "_prerun__mutmut_*", "if j + 1 <= cfg.spec_steps:"),
    (_SD + "_prerun__mutmut_*", "picks = [int(round(j * total / cfg.spec_steps)) for j in range(cfg.spec_steps + 2)]"),
    (_SD + "_prerun__mutmut_*", 'reason="prerun", blocks_computed=float(self.n_blocks),'),
    (_SD + "_prerun__mutmut_*", 'n_train = float(getattr(sched.config, "num_train_timesteps", None))'),
    (_SD + "_prerun__mutmut_*", 'n_train = float(getattr(sched.config, "num_train_timesteps", ))'),
    (_SD + "_prerun__mutmut_*", 'n_train = float(getattr(sched.config, "num_train_timesteps", 1001))'),
    (_SD + "_prerun__mutmut_*", "ctl.begin(AttnMode.DENSE, None, store_kv=None, score=True, "
                                "key_start=adapter.image_key_start(layout))"),
    (_SD + "run_step__mutmut_*", "out = self.fn_ref.original_forward(**kwargs)"),
    # consecutive_partial is written, never read
    (_SD + "_partial_step__mutmut_*", "- state.consecutive_partial += 1"),
    (_SD + "_after_full__mutmut_*", "- state.consecutive_partial = 0"),
    # a full step's level map: set_map stores "level" as int8 whatever it is given
    (_SD + "_after_full__mutmut_*", 'rec.set_map("level", torch.ones(h, dtype=None))'),
    (_SD + "_after_full__mutmut_*", 'rec.set_map("level", torch.ones(h, ))'),
    # float32 state made in torch's default dtype (float32)
    (_SD + "_after_full__mutmut_*", "state.cached_for = torch.zeros(n_img, dtype=None, device=sample.device)"),
    (_SD + "_after_full__mutmut_*", "state.cached_for = torch.zeros(n_img, device=sample.device)"),
    (_SD + "_after_full__mutmut_*", "state.hist_pos = torch.zeros(w, n_img, dtype=None, device=sample.device)"),
    (_SD + "_after_full__mutmut_*", "state.hist_pos = torch.zeros(w, n_img, device=sample.device)"),
    # _fill: the packed level counts and maps have 3 + 2 x n_image >= 5 entries; set_map stores "level" as int8
    # whatever it is given; the count of level 1 is C1's size, which the step already wrote into extra["c1"]
    (_SD + "_fill__mutmut_*", "if packed.numel() > 4:"),
    (_SD + "_fill__mutmut_*", 'rec.set_map("level", packed[3 + n_img:].to(None).reshape(grid))'),
    (_SD + "_fill__mutmut_*", 'rec.extra["XXc1XX"], rec.extra["c2"], rec.extra["c3"] = c'),
    (_SD + "_fill__mutmut_*", 'rec.extra["C1"], rec.extra["c2"], rec.extra["c3"] = c'),
]

# Survivors that can change behaviour but that no CPU test can see, as above; docs/testing.md explains each.
# They stay in the score as survivors.
EXPLAINED: list[tuple[str, str]] = [
    # the CUDA-graph replay of a partial step (cuda_graphs=True, CUDA only): never taken on the CPU
    (_SD + "_partial_step__mutmut_*", "- out, new = self._graph_subset(args, kwargs, c1, rows, info.context)"),
    # x + c * t in one op or two (add_terms), or a term rounded to x's dtype before or after the in-place add:
    # the same sum in x's dtype, up to one rounding
    ("accel.kernels.x_add_terms__mutmut_*", "out = torch.add(x, terms[0], alpha=coefs[0]) if (terms[0].dtype == "
                                            "x.dtype) and False else x + coefs[0] * terms[0].to(x.dtype)"),
    ("accel.kernels.x_add_terms__mutmut_*", "- out.add_(t if t.dtype == x.dtype else t.to(x.dtype), alpha=c)"),
    # stack forecast with cache_dtype: the growth subtracted in the streams' dtype, then rounded to the cache dtype
    # by the forecaster (one rounding), instead of both streams rounded first; the same when the streams are in
    # the cache dtype already (a bf16 model), slightly more accurate otherwise
    (_SC + "_update_stack__mutmut_*", "rec, dtype = state.recorded, _DTYPES.get(None)"),
    (_SC + "_update_stack__mutmut_*", '- feats[f"{name}.{s}"] = x.to(dtype) - y.to(dtype) if dtype is not None '
                                      "else x - y"),
    # a zero bias where no gate linear has one: the same gates; only the trace's cache_bytes counts the zeros
    (_SC + "all_gates__mutmut_*",
     "state.gate_weights = (torch.cat(ws), torch.cat(bs) if (has_bias) or True else None)"),
    # CUDA only: CUDA graphs of partial steps keep their K/V caches in persistent buffers per cache context
    # (state.graphs is False on the CPU; clearing the dict before a full step that refills it changes nothing)
    (_SD + "run_step__mutmut_*", "- state.graphs = self._graphs_on(module)"),
    (_SD + "run_step__mutmut_*", "- state.kv = self._kv_store.setdefault(info.context, {})"),
    (_SD + "run_step__mutmut_*", "- ctl.persistent_kv = state.graphs"),
    (_SD + "run_step__mutmut_*", "- if not next_partial and not state.graphs:"),
    # CUDA only: SpecDiff's per-token state made on the CPU instead of the sample's device (the same on the CPU;
    # on CUDA the next partial step would mix devices)
    (_SD + "_after_full__mutmut_*", "state.hist_count = torch.zeros(n_img, dtype=torch.long, device=None)"),
    (_SD + "_after_full__mutmut_*", "state.hist_count = torch.zeros(n_img, dtype=torch.long, )"),
    (_SD + "_after_full__mutmut_*", "state.cached_for = torch.zeros(n_img, dtype=torch.float32, device=None)"),
    (_SD + "_after_full__mutmut_*", "state.cached_for = torch.zeros(n_img, dtype=torch.float32, )"),
    (_SD + "_after_full__mutmut_*", "state.hist_pos = torch.zeros(w, n_img, dtype=torch.float32, device=None)"),
    (_SD + "_after_full__mutmut_*", "state.hist_pos = torch.zeros(w, n_img, dtype=torch.float32, )"),
    # memory only: a full step that no partial step follows keeps the K/V caches of the step before alive (until
    # the next full step that stores K/V replaces them) instead of freeing them; no partial step reads them
    (_SD + "run_step__mutmut_*", "if next_partial and not state.graphs:"),
    (_SD + "run_step__mutmut_*", "if not next_partial and state.graphs:"),
    # per-block forecast: a stream with no contribution in a segment gets the default [] (nothing added); no
    # family has such a stream (every block writes every stream), so None or no default is never reached
    (_SC + "_spec_block__mutmut_*",
     "return {s: accumulate(x, entries[segment].get(s, None), gates, coefs) for s, x in streams.items()}"),
    (_SC + "_spec_block__mutmut_*",
     "return {s: accumulate(x, entries[segment].get(s, ), gates, coefs) for s, x in streams.items()}"),
    # a Taylor restart that keeps the old nodes: the restarted terms are one (order 0), so the extra coefficients
    # multiply nothing on the torch paths; the fused verification (CUDA) would be handed more coefficients than
    # terms
    (f"accel.taylor.x{_S}TaylorForecaster{_S}update__mutmut_*",
     "old_nodes = [] if (restart) and False else self.nodes"),
    # tau with max(2, num_steps): differs only in a 1-step run, whose one step is full (tau recorded, not used)
    (f"accel.speca.x{_S}SpeCaConfig{_S}threshold_at__mutmut_*",
     "tau = float(self.threshold) * float(self.decay) ** (step / max(2, num_steps))"),
    # the verdict at error == threshold exactly (a float tie; the released code accepts it, as ours)
    (_SC + "run_step__mutmut_*",
     'verdict, reason = (rec.error is None or rec.error < rec.threshold), "verified"'),
    # gaps, no test yet: the refusal of ControlNet residuals on speculative steps (no ControlNet pipeline in the
    # tests: its condition and message), and the warm-up restart of the step before the last warm-up step
    # (restart_taylor at step warmup_steps - 2: the tests' schedules have no full step there after a restart)
    (_SC + "run_step__mutmut_*", '- if any(k.startswith("controlnet_") and k.endswith("_samples") and v is not None '
                                 "for k, v in kwargs.items()):"),
    (_SC + "run_step__mutmut_*", '- "SpeCa\'s speculative steps do not take ControlNet residuals '
                                 '(controlnet_*_samples): a speculative "'),
    (_SC + "run_step__mutmut_*", '- "step runs only the verify block. Use a schedule of full steps, or no '
                                 'ControlNet, with SpeCa.")'),
    (_SC + "run_step__mutmut_*",
     "state.restart_taylor = cfg.warmup_restarts_taylor and info.step < cfg.warmup_steps - 2"),
    # CUDA only: the pre-run's synchronisation around its timed calls (sync_timing on a CUDA device)
    (_SD + "_prerun__mutmut_*",
     '- on_cuda = cfg.sync_timing and torch.cuda.is_available() and x.device.type == "cuda"'),
    # the partial step's trace placeholders (extra c1 / c2 / c3 before the level counts are read back): _fill
    # overwrites them at once on the CPU; only a viewer reading a CUDA step before the end of an unsynchronised
    # run (sync_timing=False) sees them
    (_SD + "_partial_step__mutmut_*", '- rec.extra = {"c1": n_c1, "c2": None, "c3": None, '
                                      '"score_pairs": ctl.score_pairs,'),
    # the pre-run's overhead time x 1.001: no test can tell 0.1 % of a timing from noise
    (_SD + "_prerun__mutmut_*", "rec.time_ms = (time.perf_counter() - start) * 1001.0"),
    # ssim: for the Gaussian window torchmetrics sizes the window from sigma and only checks that kernel_size is
    # odd, so dropping kernel_size=win changes nothing but the error an even `win` raises
    ("lab.compare.x_ssim__mutmut_*", "return float(structural_similarity_index_measure(x, y, data_range=data_range, "
                                     "sigma=sigma))"),
]

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def in_scope(name: str, globs: list[str]) -> bool:
    return any(name == g or fnmatch.fnmatchcase(name, g) for g in globs)


def ensure_mutmut(python: str) -> Path:
    """The mutmut entry point next to `python`, installed there (pinned) when missing."""
    probe = subprocess.run([python, "-c", "import mutmut, sys; sys.stdout.write(mutmut.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != MUTMUT_VERSION:
        print(f"installing mutmut=={MUTMUT_VERSION} into {sys.prefix}", flush=True)
        subprocess.run([python, "-m", "pip", "install", "-q", f"mutmut=={MUTMUT_VERSION}"], check=True)
    exe = Path(python).parent / "mutmut"
    if not exe.exists():
        raise SystemExit(f"no mutmut entry point at {exe}")
    return exe


def run_mutmut(exe: Path, names: list[str], budget_s: float, max_children: int, log: Path) -> str:
    """mutmut run on `names`: "finished", "budget" (stopped at the budget) or "interrupted" (this script was)."""
    cmd = [str(exe), "run", "--max-children", str(max_children), *names]
    print(f"$ {' '.join(cmd[:4])} <{len(names)} names/globs>   (log: {log.relative_to(ROOT)})", flush=True)
    # One torch thread per worker: on a loaded CPU, OpenMP threads spin-wait and a test run takes 5x the CPU time
    # (mutmut's timeouts count CPU seconds).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        outcome = "budget"
        try:
            deadline = time.monotonic() + budget_s
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(2)
            if proc.poll() is not None:
                return "finished" if proc.returncode == 0 else "failed"
            print(f"budget of {budget_s / 60:g} min reached: stopping mutmut", flush=True)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop mutmut, then report what it did
            outcome = "interrupted"
            print("interrupted: stopping mutmut", flush=True)
        # Every result is saved to mutants/ as soon as it is known: the mutants still running are lost, the others
        # count as not checked.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return outcome


def load_results(globs: list[str]) -> dict[str, str]:
    """mutant name -> status, for the mutants in scope, from mutmut's per-file .meta files."""
    res = {}
    for meta in glob.glob(str(ROOT / "mutants" / "**" / "*.py.meta"), recursive=True):
        with open(meta) as f:
            codes = json.load(f)["exit_code_by_key"]
        for name, code in codes.items():
            if in_scope(name, globs):
                res[name] = STATUS.get(code, "suspicious")
    return res


def show(exe: Path, name: str) -> str:
    return subprocess.run([str(exe), "show", name], cwd=ROOT, capture_output=True, text=True).stdout


def mutated_lines(diff: str, sign: str = "+") -> list[str]:
    """The lines a mutant adds ("+") or removes ("-"), whitespace-normalised."""
    return [" ".join(line[1:].split()) for line in diff.splitlines()
            if line.startswith(sign) and not line.startswith(sign * 3)]


def matches(name: str, diff: str, entries: list[tuple[str, str]]) -> bool:
    """An entry's line matches the mutated line, or, written "- original line", the line the mutant replaces."""
    added, removed = mutated_lines(diff, "+"), mutated_lines(diff, "-")
    return any(fnmatch.fnmatchcase(name, g) and (line[2:] in removed if line.startswith("- ") else line in added)
               for g, line in entries)


def is_equivalent(name: str, diff: str) -> bool:
    return matches(name, diff, EQUIVALENT)


def _stop(signum, frame):
    raise KeyboardInterrupt


def function_hashes() -> dict[str, str]:
    """mutmut's name of every function and method of the mutated files (module.x_function,
    module.xǁClassǁmethod) -> a hash of its code. Mutants are numbered per function, so a mutant's name means
    the same mutant while its function's hash holds."""
    import ast

    out = {}
    for pattern in _only_mutate():
        for path in sorted(glob.glob(str(ROOT / pattern))):
            module = ".".join(Path(path).relative_to(ROOT).with_suffix("").parts)
            tree = ast.parse(Path(path).read_text())
            for node in tree.body:
                defs = [(f"{module}.x_{node.name}", node)] if isinstance(node, ast.FunctionDef) else []
                if isinstance(node, ast.ClassDef):
                    defs = [(f"{module}.x{_S}{node.name}{_S}{m.name}", m) for m in node.body
                            if isinstance(m, ast.FunctionDef)]
                for name, fn in defs:
                    out[name] = hashlib.sha256(ast.dump(fn).encode()).hexdigest()[:16]
    return out


def function_of(mutant: str) -> str:
    return re.sub(r"__mutmut_\d+$", "", mutant)


def _only_mutate() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, _stop)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutant names or globs (default: SCOPE)")
    ap.add_argument("--budget-minutes", type=float, default=60.0)
    ap.add_argument("--max-children", type=int, default=2, help="parallel mutmut workers (default 2)")
    ap.add_argument("--target", type=float, default=90.0, help="score to reach, %% (default 90)")
    ap.add_argument("--keep", action="store_true", help="keep mutants/ (for `mutmut show` / `mutmut browse`)")
    ap.add_argument("--rerun", action="store_true",
                    help="run again only what the last run (out/mutation/results.json) did not kill (survived, no "
                         "tests, timeout, suspicious, not checked; with NAMEs: only those), and every mutant of a "
                         "function changed since, e.g. after adding tests or fixing a bug, and merge the results")
    ap.add_argument("--all", action="store_true",
                    help="with --rerun: also the survivors the last report called equivalent or explained")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: report out/mutation/results.json again (the diffs from mutants/, kept by "
                         "--keep), e.g. after editing EQUIVALENT / EXPLAINED")
    args = ap.parse_args(argv)

    os.chdir(ROOT)
    exe = ensure_mutmut(sys.executable)
    OUT.mkdir(parents=True, exist_ok=True)
    results_path = OUT / "results.json"
    previous: dict[str, str] = {}
    globs = args.names or SCOPE
    hashes = function_hashes()
    if args.rerun:
        prev = json.loads(results_path.read_text())
        if prev.get("scope") != SCOPE:
            raise SystemExit("the scope changed since out/mutation/results.json: run them all")
        # a function whose code changed since: its mutants are new (numbered afresh), all of them run
        changed = sorted({function_of(n) for n in prev["status"]} - {f for f, h in prev["functions"].items()
                                                                      if hashes.get(f) == h})
        previous = {n: st for n, st in prev["status"].items() if function_of(n) not in changed}
        # survivors the last run's report called equivalent or explained stay as they are, unless --all
        last = json.loads((OUT / "summary.json").read_text()) if (OUT / "summary.json").exists() else {}
        keep = set() if args.all else set(last.get("equivalent_mutants", []) + last.get("explained_mutants", []))
        globs = sorted(n for n, st in previous.items() if st not in ("killed", "caught by type check")
                       and not (st == "survived" and n in keep))
        if args.names:  # only these, of what the last run did not kill
            globs = [n for n in globs if in_scope(n, args.names)]
        for f in changed:
            print(f"changed since the last run: {f} (all its mutants run again)")
        globs += [f + "__mutmut_*" for f in changed]
        if not globs:
            print("nothing to run again: every mutant of the last run was killed")
            return 0
    t0 = time.monotonic()
    if args.report_only:
        outcome = "finished"
    else:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)  # results of an older tree would be stale
        outcome = run_mutmut(exe, globs, args.budget_minutes * 60, args.max_children, OUT / "mutmut.log")
    if outcome == "failed":  # e.g. the clean run before the mutants failed: no result means anything
        tail = (OUT / "mutmut.log").read_text(errors="replace").splitlines()[-15:]
        print("\n".join(tail))
        print(f"mutmut failed (see {(OUT / 'mutmut.log').relative_to(ROOT)}): no score", flush=True)
        return 3
    finished = outcome == "finished"
    minutes = (time.monotonic() - t0) / 60

    if args.report_only and results_path.exists():  # the last run's statuses, merged over its re-runs
        res = {n: st for n, st in json.loads(results_path.read_text())["status"].items() if in_scope(n, globs)}
    else:
        res = load_results(globs)
    if previous:  # a mutant this run did not reach keeps its earlier status
        res = {**previous, **{n: st for n, st in res.items() if st != "not checked" or n not in previous}}
    if not args.report_only:  # (mutants/ may hold an older tree's results: the hashes would not be theirs)
        results_path.write_text(json.dumps({"scope": SCOPE, "functions": hashes, "status": res}, indent=0,
                                           ensure_ascii=False) + "\n")
    counts = Counter(res.values())
    survivors = sorted(n for n, st in res.items() if st == "survived")
    diffs = {n: show(exe, n) for n in survivors}
    equivalent = [n for n in survivors if is_equivalent(n, diffs[n])]
    explained = [n for n in survivors if n not in equivalent and matches(n, diffs[n], EXPLAINED)]
    unexplained = [n for n in survivors if n not in equivalent and n not in explained]
    with open(OUT / "survivors.txt", "w") as f:
        for n in survivors:
            tag = "[equivalent] " if n in equivalent else "[explained] " if n in explained else "[UNEXPLAINED] "
            f.write(tag + diffs[n].rstrip() + "\n\n")
        for st in ("no tests", "timeout", "suspicious", "skipped"):  # worth reading too
            for n in sorted(k for k, v in res.items() if v == st):
                f.write(f"[{st}] " + show(exe, n).rstrip() + "\n\n")

    total = len(res)
    killed, timeout = counts["killed"], counts["timeout"]
    checked = total - counts["not checked"]
    score = 100.0 * (killed + timeout) / checked if checked else 0.0
    adj = checked - len(equivalent)
    score_eq = 100.0 * (killed + timeout) / adj if adj else 0.0
    summary = {
        "outcome": outcome, "rerun": args.rerun, "minutes": round(minutes, 1), "budget_minutes": args.budget_minutes,
        "total": total, "killed": killed, "survived": counts["survived"], "equivalent": len(equivalent),
        "timeout": timeout, "no_tests": counts["no tests"], "suspicious": counts["suspicious"],
        "not_checked": counts["not checked"], "score": round(score, 2), "score_without_equivalent": round(score_eq, 2),
        "explained": len(explained), "unexplained": len(unexplained),
        "survivors": [n for n in survivors if n not in equivalent], "equivalent_mutants": equivalent,
        "explained_mutants": explained,
        "unexplained_survivors": unexplained,
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    per_function = Counter(re.sub(r"__mutmut_\d+$", "", n) for n in unexplained)
    for fn, k in sorted(per_function.items()):
        print(f"  unexplained survivors {k:3d}  {fn}")
    stopped = {"finished": "finished", "budget": "STOPPED AT THE BUDGET", "interrupted": "INTERRUPTED"}[outcome]
    what = "re-run of the last run's survivors" if args.rerun else "mutation testing"
    print(f"{what} {stopped} in {minutes:.1f} min (budget {args.budget_minutes:g} min)")
    print(f"mutants total {total}  killed {killed}  survived {counts['survived']} (equivalent {len(equivalent)}, "
          f"explained {len(explained)}, unexplained {len(unexplained)})  "
          f"timeout {timeout}  no tests {counts['no tests']}  suspicious {counts['suspicious']}  "
          f"not checked {counts['not checked']}")
    print(f"score {score:.1f} % of checked mutants killed; {score_eq:.1f} % without the equivalent ones "
          f"(target {args.target:g} %)")
    print(f"survivors' diffs: {(OUT / 'survivors.txt').relative_to(ROOT)}")
    if not args.keep:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    if not finished:
        return 2
    return 0 if score_eq >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
