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
                switch: np.ndarray | None = None, groups: np.ndarray | None = None) -> DPResult | None:
    """cost, mem_units: [layers, strategies]; switch: [layers, G, G] between layout groups or None.

    `groups` gives each strategy's layout index (default: every strategy its own group, so `switch`
    is then [layers, S, S]). The redistribution cost depends on the TP layout only, not on
    checkpointing, which cuts the transition from S^2 to G^2 + S per memory unit.
    Returns the cheapest assignment whose memory fits `budget_units`, or None if none fits.
    """
    n, S = cost.shape
    if budget_units < 0:
        return None
    V = int(budget_units)
    mem_units = mem_units.astype(np.int64)
    no_switch = switch is None or not switch.any()
    groups = np.arange(S) if groups is None else np.asarray(groups)
    # Quick exits: the fastest choice per layer fits and pays no redistribution (no switch costs, or
    # all on one layout), or even the smallest choices do not fit.
    best = cost.argmin(axis=1)
    best_mem = int(mem_units[np.arange(n), best].sum())
    free_path = no_switch or (len(set(groups[best].tolist())) == 1
                              and not switch[:, groups[best[0]], groups[best[0]]].any())
    if best_mem <= V and free_path:
        return DPResult(float(cost[np.arange(n), best].sum()), best.tolist(), best_mem)
    if mem_units.min(axis=1).sum() > V:
        return None
    if no_switch:
        return _solve_no_switch(cost, mem_units, V)
    return _solve_grouped(cost, mem_units, V, switch, groups)


def _argmin_columns(cols: list[np.ndarray], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise min over a few equal-length columns and the label of the winner (first on ties).

    A handful of vectorised minimum/where passes beats argmin along a short second axis by far.
    """
    best = cols[0].copy()
    arg = np.full(best.shape, labels[0], dtype=np.int16)
    for col, lab in zip(cols[1:], labels[1:]):
        better = col < best
        best = np.where(better, col, best)
        arg = np.where(better, np.int16(lab), arg)
    return best, arg


def _solve_no_switch(cost: np.ndarray, mem_units: np.ndarray, V: int) -> DPResult | None:
    """Without switch costs the previous layer's best over its strategies is one 1-D array per layer."""
    n, S = cost.shape
    inf = math.inf
    best = np.zeros(V + 1)           # least time of layers < i within u units (any last strategy)
    best_arg = []                    # per layer: the strategy reaching best[u]
    for i in range(n):
        cols = []
        for s in range(S):
            col = np.full(V + 1, inf)
            v = mem_units[i, s]
            if v <= V:
                col[v:] = best[: V + 1 - v] + cost[i, s]
            cols.append(col)
        best, arg = _argmin_columns(cols, list(range(S)))
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


def _solve_grouped(cost: np.ndarray, mem_units: np.ndarray, V: int, switch: np.ndarray,
                   groups: np.ndarray) -> DPResult | None:
    """DP whose switch cost depends on the layout group of each side only."""
    n, S = cost.shape
    G = switch.shape[1]
    members = [np.flatnonzero(groups == g).tolist() for g in range(G)]
    inf = math.inf
    f = []                            # per strategy: least time with the current layer on it, per u
    for s in range(S):
        col = np.full(V + 1, inf)
        v = mem_units[0, s]
        if v <= V:
            col[v:] = cost[0, s]
        f.append(col)
    within_arg = []   # per layer i: per group, [u] -> best strategy of that group (for backtracking)
    group_arg = []    # per layer i >= 1: per group g, [u] -> best previous group g'
    for i in range(1, n):
        h, wa = [], []
        for mem in members:
            if mem:
                best, arg = _argmin_columns([f[s] for s in mem], mem)
            else:
                best, arg = np.full(V + 1, inf), np.zeros(V + 1, dtype=np.int16)
            h.append(best)
            wa.append(arg)
        within_arg.append(wa)
        m, ga = [], []
        for g in range(G):
            best, arg = _argmin_columns([h[q] + switch[i][q, g] for q in range(G)], list(range(G)))
            m.append(best)
            ga.append(arg)
        group_arg.append(ga)
        new = []
        for s in range(S):
            col = np.full(V + 1, inf)
            v = mem_units[i, s]
            if v <= V:
                col[v:] = m[groups[s]][: V + 1 - v] + cost[i, s]
            new.append(col)
        f = new
    last = np.array([col[V] for col in f])
    s = int(last.argmin())
    if not np.isfinite(last[s]):
        return None
    total = float(last[s])
    choice = [0] * n
    u = V
    for i in range(n - 1, 0, -1):
        choice[i] = s
        u -= int(mem_units[i, s])
        g_prev = int(group_arg[i - 1][groups[s]][u])
        s = int(within_arg[i - 1][g_prev][u])
    choice[0] = s
    used = int(sum(mem_units[i, c] for i, c in enumerate(choice)))
    return DPResult(total, choice, used)
