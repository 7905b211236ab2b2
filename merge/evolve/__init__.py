"""Recipe search (evolutionary model merging): a search config, an optuna study, trials on Dask.

``run_search(config, out_dir)`` searches the numbers (and optionally the method) of a mergekit recipe
against objectives (``merge.evolve.objectives``) and writes the best recipe as plain mergekit YAML.
See ``docs/evolve.md``.
"""

from merge.evolve.config import SearchConfig, SearchSpace, load_search_config, parse_space
from merge.evolve.objectives import ObjectiveContext, all_objectives, register_objective
from merge.evolve.report import SearchResult, TrialRecord
from merge.evolve.study import EvolveProgress, run_search

__all__ = [
    "EvolveProgress",
    "ObjectiveContext",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "TrialRecord",
    "all_objectives",
    "load_search_config",
    "parse_space",
    "register_objective",
    "run_search",
]
