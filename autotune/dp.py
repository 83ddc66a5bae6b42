"""The per-stage dynamic program: pick one strategy per layer minimising time under a memory budget.

f[u, s] = least time of the layers so far using at most u memory units, the last layer using
strategy s. Transition: f'[u, s] = c[i, s] + min_s' (f[u - v[i, s], s'] + R[i, s', s]). The switch
cost R is zero between equal layouts; it is where per-layer TP will charge activation
redistribution. Memory is in integer units of `resolution` bytes, each layer rounded *up*, so the DP
never accepts a stage that its own cost model puts over budget; it may reject one that is within
(layers x resolution) of the limit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class DPResult:
    time_s: float
    choice: list[int]      # strategy index per layer
    memory_units: int


def solve_stage(cost: np.ndarray, mem_units: np.ndarray, budget_units: int,
                switch: np.ndarray | None = None) -> DPResult | None:
    """cost, mem_units: [layers, strategies]; switch: [layers, S, S] (from s' to s) or None.

    Returns the cheapest assignment whose memory fits `budget_units`, or None if none fits.
    """
    n, S = cost.shape
    if budget_units < 0:
        return None
    V = int(budget_units)
    mem_units = mem_units.astype(np.int64)
    # Quick exits: the fastest choice per layer fits, or even the smallest choices do not.
    best = cost.argmin(axis=1)
    if mem_units[np.arange(n), best].sum() <= V and (switch is None or not switch.any()):
        return DPResult(float(cost[np.arange(n), best].sum()), best.tolist(), int(mem_units[np.arange(n), best].sum()))
    if mem_units.min(axis=1).sum() > V:
        return None
    if switch is None or not switch.any():
        return _solve_no_switch(cost, mem_units, V)
    inf = math.inf
    f = np.full((V + 1, S), inf)
    for s in range(S):
        v = mem_units[0, s]
        if v <= V:
            f[v:, s] = cost[0, s]
    marks = np.zeros((n, V + 1, S), dtype=np.int16)
    for i in range(1, n):
        g = np.full((V + 1, S), inf)
        for s in range(S):
            v = mem_units[i, s]
            if v > V:
                continue
            prev = f[: V + 1 - v] + switch[i, :, s][None, :]   # f[u - v, s'] + R for u = v..V
            arg = prev.argmin(axis=1)
            g[v:, s] = prev[np.arange(V + 1 - v), arg] + cost[i, s]
            marks[i, v:, s] = arg
        f = g
    s = int(f[V].argmin())
    if not np.isfinite(f[V, s]):
        return None
    total = float(f[V, s])
    choice = [0] * n
    u = V
    for i in range(n - 1, -1, -1):
        choice[i] = s
        prev_s = int(marks[i, u, s])
        u -= int(mem_units[i, s])
        s = prev_s
    used = int(sum(mem_units[i, c] for i, c in enumerate(choice)))
    return DPResult(total, choice, used)


def _solve_no_switch(cost: np.ndarray, mem_units: np.ndarray, V: int) -> DPResult | None:
    """Without switch costs the previous layer's best over its strategies is one 1-D array per layer."""
    n, S = cost.shape
    inf = math.inf
    best = np.full(V + 1, inf)       # least time of layers < i within u units (any last strategy)
    best[0:] = 0.0
    best_arg = []                    # per layer: the strategy reaching best[u]
    for i in range(n):
        g = np.full((V + 1, S), inf)
        for s in range(S):
            v = mem_units[i, s]
            if v <= V:
                g[v:, s] = best[: V + 1 - v] + cost[i, s]
        arg = g.argmin(axis=1)
        best = g[np.arange(V + 1), arg]
        best_arg.append(arg)
    if not np.isfinite(best[V]):
        return None
    total = float(best[V])
    choice = [0] * n
    u = V
    for i in range(n - 1, -1, -1):
        s = int(best_arg[i][u])
        choice[i] = s
        u -= int(mem_units[i, s])
    used = int(sum(mem_units[i, c] for i, c in enumerate(choice)))
    return DPResult(total, choice, used)
