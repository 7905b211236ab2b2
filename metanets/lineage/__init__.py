"""Lineage detection: which of the candidates is a model's parent (grandparent...), or none of them.

``detect_lineage`` (:mod:`metanets.lineage.api`) is the library call for one child;
``recover_model_graph`` (:mod:`metanets.lineage.graph`) recovers a whole pool's directed graph
(families, fine-tune edges, merges). The methods' statistics (:mod:`.stats`, :mod:`.pool`), alignment
(:mod:`.align`), probes (:mod:`.probe`), the learned detector (:mod:`.learned`), results and pictures
(:mod:`.result`, :mod:`.graph_result`, :mod:`.tree`, :mod:`.graph_draw`) and the lineage zoos
(:mod:`.zoo`) are its parts.
"""

from metanets.lineage.api import detect_lineage
from metanets.lineage.graph import recover_model_graph
from metanets.lineage.graph_result import ModelGraph

__all__ = ["ModelGraph", "detect_lineage", "recover_model_graph"]
