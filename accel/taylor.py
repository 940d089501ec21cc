"""Taylor forecaster: extrapolate a block's features from the full steps seen so far.

Two forms, same memory (order + 1 tensors per feature):
- "newton": Newton divided differences over the last order+1 full steps. The forecast is the
  interpolating polynomial through those steps, so a trajectory that is a polynomial of degree <= order
  is forecast exactly, for any spacing of the full steps.
- "reference": TaylorSeer/SpeCa's recursive differences, D[i+1] = (D[i]_new - D[i]_prev) / N with N the
  distance between the last two full steps, and F(k) = sum_i D[i] k^i / i!. Exact up to order 1; for
  higher orders each D[i] estimates the derivative at a lagging point.
Positions `x` are step indices or sigmas (see `SpeCaConfig.distance`).
"""

from __future__ import annotations

import math

import torch

from .kernels import taylor_update

Features = dict[str, torch.Tensor]


class TaylorForecaster:
    def __init__(self, order: int, form: str = "newton", dtype: torch.dtype | None = None,
                 store: dict | None = None):
        self.order = order
        self.form = form
        self.dtype = dtype
        self.terms: dict[str, list[torch.Tensor]] = {}
        self.nodes: list[float] = []  # positions of the full steps, newest first
        self.store = store
        """Optional persistent buffers, (feature name, term index) -> tensor: each update copies its new terms
        into them, so the terms keep their addresses from one full step to the next (a CUDA graph reads them);
        a buffer is made anew only for a new feature, shape, dtype or device."""

    @property
    def ready(self) -> bool:
        return bool(self.nodes)

    @property
    def active_order(self) -> int:
        return max(0, min(self.order, len(self.nodes) - 1))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.terms.values() for t in ts)

    def update(self, x: float, feats: Features, restart: bool = False) -> None:
        """Record the real features of a full step at position x. restart: forget the earlier full steps, so
        the terms start again at order 0 (the released code does this during its warm-up)."""
        old_nodes = [] if restart else self.nodes
        for name, f in feats.items():
            f = f.detach()
            if self.dtype is not None and f.dtype != self.dtype:
                f = f.to(self.dtype)
            old = [] if restart else self.terms.get(name, [])
            m = min(len(old), self.order)
            # Newton: f[x, x0..xi] = (f[x, x0..x(i-1)] - f[x0..xi]) / (x - xi)
            # reference: divide by the distance to the last full step every time
            if self.form == "newton":
                inv = [1.0 / (x - old_nodes[i]) for i in range(m)]
            else:
                inv = [1.0 / (x - old_nodes[0])] * m if m else []
            new = taylor_update(f, old, inv)
            if self.store is not None:
                new = [self._persist(name, i, t) for i, t in enumerate(new)]
            self.terms[name] = new
        self.nodes = ([x] + old_nodes)[: self.order + 1]

    def _persist(self, name: str, i: int, t: torch.Tensor) -> torch.Tensor:
        buf = self.store.get((name, i))
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
            buf = self.store[(name, i)] = t.clone()
        elif buf is not t:
            buf.copy_(t)
        return buf

    def coefficients(self, x: float) -> list[float]:
        """The forecast at x is sum_i c_i * terms[i]; these are the c_i."""
        m = len(self.nodes) - 1 if self.nodes else 0
        m = min(m, self.order)
        if self.form == "newton":  # d0 + (x-x0) d1 + (x-x0)(x-x1) d2 + ...
            coefs, prod = [1.0], 1.0
            for i in range(m):
                prod *= x - self.nodes[i]
                coefs.append(prod)
            return coefs
        k = x - self.nodes[0]  # reference: sum_i D[i] k^i / i!
        return [k**i / math.factorial(i) for i in range(m + 1)]

    def predict(self, x: float) -> "Forecast":
        if not self.ready:
            raise RuntimeError("TaylorForecaster.predict before any full step")
        return Forecast(self.terms, self.coefficients(x))


class Forecast:
    """Features at one position, kept as coefficients x Taylor terms until used: `forecast[name]` builds a
    tensor (SpeCa's speculative steps never build most of them: see kernels.accumulate)."""

    def __init__(self, terms: dict[str, list[torch.Tensor]], coefs: list[float]):
        self.terms = terms
        self.coefs = coefs

    def __getitem__(self, name: str) -> torch.Tensor:
        terms = self.terms[name]
        p = terms[0] if self.coefs[0] == 1.0 else terms[0] * self.coefs[0]
        for t, c in zip(terms[1:], self.coefs[1:]):
            p = torch.add(p, t, alpha=c)
        return p
