"""Git Re-Basin: matching (:mod:`.matching`), evaluation (:mod:`.evaluation`), the library call (:mod:`.api`).

The recipe method ``git_rebasin`` is registered in :mod:`merge.methods.rebasin`.
"""
