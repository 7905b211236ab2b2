"""A search's best recipe is mergekit's YAML: mergekit 0.1.5 runs it and writes weightsmith's tensors (issue 25).

A short recipe search (``merge.evolve.run_search``) on the LLaMA-shaped float32 checkpoints of
``bench/make_models.py --size tiny --dtype float32`` (base + 2 fine-tunes): per model a weight and a
density, one value per group of 3 layers (``layer_groups``: written into the recipe as ``filter``
conditions, one per layer, plus the rest), λ global, for each method in ``--methods``. The objective is a cheap
deterministic ``code`` function (the search machinery is what is exercised, not the score). Each search's
``best_recipe.yml`` is then run as it is by ``mergekit-yaml`` (in ``bench/.venv-mergekit``) and by
``weightsmith merge``, and every output tensor is compared (float64, ``allclose`` at rtol 1e-5, atol 1e-6).
TIES picks its top-k by magnitude and ties at the cut are ordered differently by the two tools (see
``bench/parity_mergekit.py``); the table reports the fraction of elements beyond tolerance.

    .venv/bin/python bench/evolve_mergekit.py                   # ties and task_arithmetic, 8 trials each
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (  # noqa: E402
    MODELS,
    OUT,
    compare_checkpoints,
    ensure_mergekit,
    machine_info,
    mergekit_cmd,
    print_table,
    remove_output,
    run_measured,
    tool_env,
    weightsmith_cmd,
    write_json,
)

SCORER = '''
def score(sd):
    """Deterministic and cheap: the mean of the final norm's weight and of one attention matrix."""
    w = sd["model.norm.weight"].double().mean() + sd["model.layers.0.self_attn.q_proj.weight"].double().mean()
    return float(w)
'''


def search_config(models: Path, method: str, scorer: Path, trials: int) -> dict[str, Any]:
    per = {"weight": {"min": 0.2, "max": 1.0}}
    if method != "task_arithmetic":
        per["density"] = {"min": 0.2, "max": 0.9}
    return {
        "recipe": {"merge_method": method, "base_model": str(models / "base"), "dtype": "float32",
                   "models": [{"model": str(models / f), "parameters": per} for f in ("ft1", "ft2")],
                   "parameters": {"lambda": {"min": 0.5, "max": 1.5}}},
        "layer_groups": 3,
        "objectives": [{"code": {"function": f"{scorer}:score"}}],
        "budget": {"trials": trials}, "sampler": "random", "batch": 4, "seed": 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="ties,task_arithmetic")
    ap.add_argument("--trials", type=int, default=8)
    args = ap.parse_args()
    from merge.evolve import run_search

    models = MODELS / "tiny-float32"
    if not (models / "ft2").exists():
        sys.exit(f"{models} is missing: python bench/make_models.py --size tiny --dtype float32")
    ensure_mergekit()
    work = OUT / "evolve_mergekit"
    remove_output(work)
    work.mkdir(parents=True)
    scorer = work / "score.py"
    scorer.write_text(SCORER)
    rows, results = [], []
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        r = run_search(search_config(models, method, scorer, args.trials), work / f"search-{method}",
                       allow_code=True)
        search_s = time.perf_counter() - t0
        recipe = Path(r.best_recipe)
        mk = run_measured(mergekit_cmd(recipe, work / f"mk-{method}"), env=tool_env())
        ws = run_measured(weightsmith_cmd(recipe, work / f"ws-{method}"), env=tool_env())
        if mk.rc != 0 or ws.rc != 0:
            raise SystemExit(f"{method}: mergekit rc {mk.rc}, weightsmith rc {ws.rc}\n{mk.stderr[-2000:]}\n"
                             f"{ws.stderr[-2000:]}")
        cmp = compare_checkpoints(work / f"ws-{method}", work / f"mk-{method}")
        conditions = sum(isinstance(v, list) for m in yaml.safe_load(recipe.read_text())["models"]
                         for v in (m.get("parameters") or {}).values())
        row = {"method": method, "trials": r.complete, "search_s": round(search_s, 1),
               "recipe_conditions": conditions, "tensors": cmp.n_compared, "allclose": cmp.n_allclose,
               "max_abs": cmp.max_abs, "frac_beyond": cmp.frac_beyond, "only_one_side": cmp.only_a + cmp.only_b}
        results.append(row)
        rows.append([method, r.complete, row["search_s"], conditions, f"{cmp.n_allclose}/{cmp.n_compared}",
                     f"{cmp.max_abs:.2e}", f"{cmp.frac_beyond:.2e}"])
    table = print_table(["method", "trials", "search s", "per-layer settings", "tensors allclose", "max |diff|",
                         "beyond tol"], rows)
    write_json(OUT / "evolve_mergekit.json", {"machine": machine_info(), "command": " ".join(sys.argv),
                                              "results": results, "table": table})


if __name__ == "__main__":
    main()
