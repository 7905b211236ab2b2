"""The data-free objective of a recipe search: what a trained metanet predicts for the merged weights.

Registered into :mod:`merge.evolve.objectives` as ``metanet`` when this module is imported (``weightsmith
evolve`` does; ``merge`` never imports ``metanets``). Options: ``metanet: FOLDER`` (a trained metanet:
``weightsmith metanet train``, a regression target such as test accuracy), optionally ``direction``
(default maximize). No data is read: the merge is scored from its weights alone (Unterthiner et al. 2020;
Graph Metanetworks, Lim et al. 2024; the metanet's card says what it was trained to predict).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from merge.errors import RecipeError
from merge.evolve.objectives import ObjectiveContext, Score, register_objective


@register_objective("metanet", direction=None)
def _metanet(opts: dict[str, Any], ctx: ObjectiveContext) -> Score:
    """The value a trained metanet predicts for the merged weights (data-free), e.g. its test accuracy."""
    what = "objective 'metanet'"
    unknown = set(opts) - {"metanet"}
    if unknown:
        raise RecipeError(f"{what}: unknown option '{sorted(unknown)[0]}' (known: metanet, direction)")
    from metanets.train import load_metanet, predict

    loaded = load_metanet(ctx.path(opts.get("metanet"), f"{what}: metanet"), device=ctx.device)
    target = loaded[1]["target"]
    if target["kind"] != "regression":
        raise RecipeError(f"{what}: the metanet predicts '{target['name']}' ({target['kind']}); "
                          "a search needs a number (a regression target)")

    def score(state: Mapping[str, torch.Tensor]) -> float:
        return float(predict(loaded, [dict(state)], device=ctx.device)[0]["prediction"])

    return score
