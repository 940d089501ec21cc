"""What every family's SpecDiff attention processor shares: the attention-received score, the K/V cache and
the attention call. A family processor (`accel/adapters/<family>/attention.py`) only projects its queries,
keys and values (norms, rotary embedding, joint token order) and splits the output; it hands the joint
sequence to `KVCacheAttnProcessor.attend`.

`attention_received` = for every key, the softmax attention it receives, averaged over heads and over the
(valid) queries given: the column means of the head-averaged softmax map. It is computed `chunk` queries at a
time, so memory is `chunk x keys x heads`, never the N x N map.

`AttnControl` is what SpecDiff's model hook tells the processors for the call in flight; its `mode` says what
`attend` does:

- `AttnMode.ORIGINAL`: SpecDiff is not in this call; the processor calls the processor it replaced.
- `AttnMode.DENSE`: every token came in. The attention is the same op as diffusers' processors (bit-identical
  output); optionally this layer's K and V (all tokens, after norm and RoPE) are kept as the K/V cache, and
  attention received is scored.
- `AttnMode.SUBSET`: only the computed tokens came in (text + C1 image tokens). Their K/V rows overwrite the
  cache rows (`control.rows` = their joint positions) and their queries attend over the whole cache, i.e. over
  every token: computed ones with fresh K/V, the others with the K/V of the step that last computed them.

The scores are computed on the side, from the same query/key tensors, and never touch the output path.
"""

from __future__ import annotations

import math
import os
from enum import Enum

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from torch.nn.attention import SDPBackend

from .. import kernels


class AttnMode(str, Enum):
    """What the K/V-caching processors do in the call in flight (module doc). The values are the strings
    `AttnControl.begin` also accepts; they are not the trace's step decisions (`accel.trace`)."""

    ORIGINAL = "off"
    DENSE = "full"
    SUBSET = "partial"


@torch.no_grad()
def attention_received(query: torch.Tensor, key: torch.Tensor, n_keys: int | None = None,
                       key_mask: torch.Tensor | None = None, query_mask: torch.Tensor | None = None,
                       chunk: int = 1024, *, key_start: int = 0, scale: float | None = None,
                       lse: torch.Tensor | None = None, query_stride: int = 1) -> torch.Tensor:
    """Attention received by the keys `key_start : key_start + n_keys` (all keys from `key_start` when
    `n_keys` is None), averaged over heads and over the valid scored queries: float32 [B, keys scored].

    `query` [B, Sq, H, D], `key` [B, Sk, H, D] (diffusers' sequence-dim-1 layout, after norm and RoPE).
    `key_mask` [B, Sk] / `query_mask` [B, Sq] bool (True = a real token) or None (all real): masked keys get
    no attention, masked queries give none. `query_stride` scores every `query_stride`-th query only.
    `lse`: the row log-sum-exp of the scaled logits [B, H, >= Sq] (natural log, over every key, masked ones
    out), as the attention call returns it; computed here when None. Without masks and with stride 1 this
    equals `softmax(q k^T * scale).mean(heads).mean(queries)[:, key_start : key_start + n_keys]` (scale
    defaults to 1/sqrt(D), as SDPA), computed as `sum_q exp(scale * q.k - lse_q)` without materialising the
    map: a fused Triton kernel on CUDA (`accel.kernels.column_sums`), the same math chunked over `chunk`
    queries in torch elsewhere, in float32.
    """
    b, sq, h, d = query.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    n_keys = key.shape[1] - key_start if n_keys is None else n_keys
    if lse is None:
        lse = kernels.row_logsumexp(query, key, scale, key_mask, query_stride, chunk=chunk)
    else:
        lse = lse[:, :, :sq:query_stride]
    query_weight = None if query_mask is None else query_mask.to(torch.float32)  # [B, Sq]
    sums = kernels.column_sums(query, key, lse, scale, key_start, n_keys, query_weight, query_stride, chunk=chunk)
    if query_weight is None:
        n_queries = float((sq + query_stride - 1) // query_stride)
    else:
        n_queries = query_weight[:, ::query_stride].sum(dim=1, keepdim=True).clamp_min(1.0)
    return sums / (n_queries * h)


def _sdpa_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """SDPA without a mask through the very kernel `torch.nn.functional.scaled_dot_product_attention` would
    pick (so the output is the same), asking that kernel for its row log-sum-exp: (out [B, S, H, D],
    lse [B, H, >= Sq]), or None when the pick returns none (the math fallback) or SPECLAB_SDPA_LSE=0.
    Inputs [B, S, H, D]."""
    if os.environ.get("SPECLAB_SDPA_LSE", "1") == "0":
        return None
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    choice = int(torch._fused_sdp_choice(q, k, v))
    ops = torch.ops.aten
    if choice == int(SDPBackend.FLASH_ATTENTION):
        if q.is_cuda:
            out, lse = ops._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
        elif q.device.type == "cpu":
            out, lse = ops._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        else:
            return None
    elif choice == int(SDPBackend.EFFICIENT_ATTENTION) and q.is_cuda:
        out, lse = ops._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False)[:2]
    elif choice == int(SDPBackend.CUDNN_ATTENTION) and q.is_cuda:
        out, lse = ops._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
        lse = lse.reshape(lse.shape[0], lse.shape[1], -1)
    else:
        return None
    return out.permute(0, 2, 1, 3), lse


class AttnControl:
    """What the model hook tells the attention processors for the call in flight (one per attached pipeline)."""

    def __init__(self, score_every: int = 1, score_chunk: int = 1024, score_query_stride: int = 1):
        self.score_every = score_every
        self.score_chunk = score_chunk
        self.score_query_stride = score_query_stride
        self.mode = AttnMode.ORIGINAL
        self.active = False
        """mode is not ORIGINAL: the one value the processors read in a compiled region (a bool, so DENSE and
        SUBSET calls share one compiled graph; everything else is read inside `attend`, outside the graph)."""
        self.kv: dict | None = None
        """layer -> (K, V), [B, S_all, H, D]: the K/V cache of the current cache context."""
        self.store_kv = False
        self.persistent_kv = False
        """Store K/V by copying into the buffers already in `kv` (same shapes), so that CUDA graphs recorded
        against those buffers stay valid; a new buffer bumps `kv_generation`."""
        self.kv_generation = 0
        self.modulation = None
        """SpecDiff's modulation table view for the step in flight (partial steps with hoisting), else None."""
        self.rows: torch.Tensor | None = None
        """Joint-sequence positions of the tokens computed on a SUBSET call (text + C1 image tokens)."""
        self.key_start = 0
        """Where the image tokens start among the keys, for processors that cannot tell from their inputs
        (FLUX single blocks get text and image already joined)."""
        self.score = False
        self.scores: torch.Tensor | None = None
        """Accumulated attention received per image token, float32 [B, N_image] (sum over scored layers)."""
        self.score_pairs = 0
        """query x key scores computed in this call (batch x heads x scored queries x keys, summed over layers)."""
        self.score_layers = 0
        self.attn_pairs = 0
        """query x key pairs the attention itself computed in this call (same units as `score_pairs`)."""

    def begin(self, mode: AttnMode | str, kv: dict | None, store_kv: bool, score: bool, rows=None,
              key_start: int = 0):
        self.mode, self.kv, self.store_kv, self.score = AttnMode(mode), kv, store_kv, score
        self.active = self.mode is not AttnMode.ORIGINAL
        self.persistent_kv = False
        self.modulation = None
        self.rows, self.key_start = rows, key_start
        self.scores, self.score_pairs, self.score_layers, self.attn_pairs = None, 0, 0, 0

    def end(self) -> None:
        self.mode, self.kv, self.rows, self.score, self.store_kv = AttnMode.ORIGINAL, None, None, False, False
        self.active = False
        self.modulation = None

    def scores_layer(self, layer: int) -> bool:
        return self.score and layer % self.score_every == 0

    def add_scores(self, query: torch.Tensor, key: torch.Tensor, key_start: int, n_keys: int | None = None,
                   key_mask: torch.Tensor | None = None, query_mask: torch.Tensor | None = None,
                   lse: torch.Tensor | None = None) -> None:
        """Add one layer's attention received by the image keys `key_start : key_start + n_keys` (`lse`: the
        attention call's row log-sum-exp, if it gave one)."""
        stride = self.score_query_stride
        s = attention_received(query, key, n_keys, key_mask, query_mask, self.score_chunk, key_start=key_start,
                               lse=lse, query_stride=stride)
        if self.scores is None:
            self.scores = s
        else:
            self.scores.add_(s)
        b, sq, h, _ = query.shape
        self.score_pairs += b * h * ((sq + stride - 1) // stride) * key.shape[1]
        self.score_layers += 1


class KVCacheAttnProcessor:
    """The base of every family's SpecDiff attention processor: its layer index, the run's control, and the
    processor it replaced (called in `AttnMode.ORIGINAL`, restored on remove), whose backend settings it keeps
    so that the attention call is the same op."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: int, control: AttnControl, original):
        self.layer = layer
        self.control = control
        self.original = original
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def passes_through(self) -> bool:
        """SpecDiff is not in this call: the replaced processor does it."""
        return not self.control.active

    def _native_backend(self) -> bool:
        """The attention call is diffusers' native one (torch SDPA), with no context parallelism."""
        if self._parallel_config is not None:
            return False
        backend = self._attention_backend
        if backend is None:
            backend = _AttentionBackendRegistry.get_active_backend()[0]
        return backend in (AttentionBackendName.NATIVE, AttentionBackendName.NATIVE.value)

    def _attention(self, query, key, value, attention_mask, want_lse: bool):
        """(attention output [B, Sq, H, D], row log-sum-exp or None). With `want_lse`, no mask and the native
        backend, the SDPA kernel torch would pick anyway returns its LSE too (`_sdpa_with_lse`)."""
        if want_lse and attention_mask is None and self._native_backend():
            got = _sdpa_with_lse(query, key, value)
            if got is not None:
                return got
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        return out, None

    @torch.compiler.disable
    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, image_keys: slice | None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the joint sequence given, through the K/V cache: [B, Sq, H * D] in the query dtype.

        `query`/`key`/`value` [B, S, H, D] after norm and RoPE, in the family's joint token order.
        `image_keys`: where the image tokens sit among the keys, valid for the tokens given and for the whole
        cache alike (a prefix or a suffix); None = from `control.key_start` on. `attention_mask`: None, or a
        boolean key mask [B, 1, 1, S] over the tokens given (True = a real token); on a SUBSET call it is
        widened to every cached key (the cached image keys are real; the tokens given keep theirs), and
        scoring honours it for keys and queries.

        Never compiled (`torch.compiler.disable`): under regional compilation the blocks' projections and MLPs
        compile and this runs as is, so the per-layer state it reads (layer index, mode, cache, rows) guards
        no graph and triggers no recompilation.
        """
        ctl = self.control
        query_mask = None if attention_mask is None else attention_mask.reshape(attention_mask.shape[0], -1)
        if ctl.mode is AttnMode.SUBSET:
            k_all, v_all = ctl.kv[self.layer]
            kernels.kv_scatter(k_all, v_all, ctl.rows, key, value)
            key, value = k_all, v_all
            if attention_mask is not None:
                full = attention_mask.new_ones(attention_mask.shape[0], key.shape[1])
                full[:, ctl.rows] = query_mask
                attention_mask = full[:, None, None, :]
        elif ctl.store_kv:
            old = ctl.kv.get(self.layer) if ctl.persistent_kv else None
            if old is not None and old[0].shape == key.shape and old[0].dtype == key.dtype:
                old[0].copy_(key)
                old[1].copy_(value)
            else:
                if ctl.persistent_kv:
                    ctl.kv_generation += 1
                ctl.kv[self.layer] = (key, value)  # no copy: these tensors are not used after this call
        score = ctl.scores_layer(self.layer)
        hidden_states, lse = self._attention(query, key, value, attention_mask, want_lse=score)
        if score:
            key_mask = None if attention_mask is None else attention_mask.reshape(attention_mask.shape[0], -1)
            if image_keys is None:
                image_keys = slice(ctl.key_start, None)
            start, stop, _ = image_keys.indices(key.shape[1])
            ctl.add_scores(query, key, start, stop - start, key_mask, query_mask, lse=lse)
        ctl.attn_pairs += query.shape[0] * query.shape[2] * query.shape[1] * key.shape[1]
        return hidden_states.flatten(2, 3).to(query.dtype)


__all__ = ["AttnControl", "AttnMode", "KVCacheAttnProcessor", "attention_received"]
