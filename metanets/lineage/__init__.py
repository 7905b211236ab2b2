"""Lineage detection: which of the candidates is a model's parent (grandparent...), or none of them.

``detect_lineage`` (:mod:`metanets.lineage.api`) is the library call; the methods' statistics
(:mod:`.stats`), alignment (:mod:`.align`), probes (:mod:`.probe`), the learned detector (:mod:`.learned`),
results and trees (:mod:`.result`, :mod:`.tree`) and the lineage zoos (:mod:`.zoo`) are its parts.
"""

from metanets.lineage.api import detect_lineage

__all__ = ["detect_lineage"]
