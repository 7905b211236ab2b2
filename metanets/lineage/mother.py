"""MoTHer's recipe as a baseline: Horwitz, Shul, Hoshen, "On the Origin of Llamas: Model Tree Heritage
Recovery" (2024), as its authors' code (eliahuhorwitz/MoTHer) computes it, for comparison with
:func:`metanets.lineage.recover_model_graph` on the same pools.

Per family (given, as the authors' code takes the number of trees): for every weight matrix (heads
left out), the pairwise max |W_a − W_b|, min-max normalised over the family's pairs; the distance
``D`` is the maximum over matrices. Direction: the summed excess kurtosis of the matrices, which
falls from parent to child (their default; ``rev=True`` flips it, as their code does for Stable
Diffusion). Edge cost ``D[a, b] + λ · mean(D) · [ku_b > ku_a]`` (λ = 0.3), minimum spanning
arborescence (Edmonds). There are no merge nodes: every model gets one parent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import networkx as nx
import numpy as np
import torch

from metanets.lineage.stats import head_tensors


def mother_tree(
    states: Mapping[str, Mapping[str, torch.Tensor]], families: Sequence[Sequence[str]], *, lam: float = 0.3,
    rev: bool = False,
) -> dict[str, str]:
    """``{child: parent}`` over every family's arborescence (roots have no entry)."""
    parents: dict[str, str] = {}
    for members in families:
        members = list(members)
        n = len(members)
        if n < 2:
            continue
        first = states[members[0]]
        shapes = {k: tuple(v.shape) for k, v in first.items()}
        heads = head_tensors(list(shapes), shapes)
        layers = [k for k, s in shapes.items() if len(s) >= 2 and k not in heads]
        per_layer = []
        ku = np.zeros(n)
        for k in layers:
            w = torch.stack([states[m][k].double().reshape(-1) for m in members])
            d = np.zeros((n, n))
            for i in range(n):
                d[i] = (w - w[i]).abs().amax(1).numpy()
            off = d[~np.eye(n, dtype=bool)]
            lo, hi = off.min(), off.max()
            per_layer.append((d - lo) / (hi - lo) if hi > lo else np.zeros_like(d))
            x = w - w.mean(1, keepdim=True)
            ku += ((x**4).mean(1) / (x**2).mean(1) ** 2 - 3.0).numpy()
        D = np.max(per_layer, axis=0)
        np.fill_diagonal(D, 0)
        T = (ku[None, :] < ku[:, None]) if rev else (ku[None, :] > ku[:, None])  # [a, b]: b is "older"
        cost = D + lam * D.mean() * T.astype(float)
        g = nx.DiGraph()
        for i in range(n):
            for j in range(n):
                if i != j:
                    g.add_edge(i, j, weight=float(cost[i, j]))
        for i, j in nx.minimum_spanning_arborescence(g, attr="weight").edges():
            parents[members[j]] = members[i]
    return parents
