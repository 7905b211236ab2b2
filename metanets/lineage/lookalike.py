"""Is an unrelated-looking candidate a relative whose hidden units were permuted? (a hint for ``weights``)

Permuting hidden units (:func:`metanets.lineage.zoo.permutation_attack`) leaves a network's function
unchanged and defeats every comparison of weights by position, so the ``weights`` method scores a
permuted relative like a stranger. The input side of the first layers is not permuted (the inputs are
fixed features; in a transformer the token rows of the embedding), so a relative's rows (or columns)
still match the child's one to one, in some order, while an independent model's do not. For up to
three shared matrices (convolutions read as out × in·k·k), in the model's order, each row of the
child is matched to its most similar row of the candidate (cosine), and likewise for columns; the
*match* is the larger of the two mean best cosines, maximised over the matrices: ≈1 for a permuted
copy of a relative, far lower for an independent initialisation. Method ``aligned`` (Git Re-Basin
weight matching) then scores it properly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from merge.checkpoint import TensorSource
from merge.symmetry import natural_key
from metanets.lineage.stats import read

#: the mean best-match cosine above which a candidate looks like a permuted relative
LOOKALIKE = 0.75
MAX_SIDE = 4096


def _best_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the rows of ``a`` of the best cosine with any row of ``b``."""
    an = torch.nn.functional.normalize(a.float(), dim=1)
    bn = torch.nn.functional.normalize(b.float(), dim=1)
    return float((an @ bn.T).amax(1).mean())


def permuted_match(child: TensorSource, candidate: TensorSource, shared: Sequence[str], matrices: int = 3) -> float:
    """The match statistic of the module docstring (0 when no shared matrix is small enough)."""
    names = [
        n for n in sorted(shared, key=natural_key)
        if len(child.shape(n)) >= 2 and child.shape(n)[0] <= MAX_SIDE and 1 < math.prod(child.shape(n)[1:]) <= MAX_SIDE
    ][:matrices]
    best = 0.0
    for n in names:
        a, b = read(child, n).flatten(1), read(candidate, n).flatten(1)  # convolutions: out × in·k·k
        best = max(best, _best_cosine(a, b), _best_cosine(a.T, b.T))
    return best
