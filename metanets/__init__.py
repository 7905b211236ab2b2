"""Networks that read other networks' weights (metanetworks).

- :mod:`metanets.graph`: the parameter graph of a model, built from its PermutationSpec
- :mod:`metanets.gmn`: Graph Metanetworks (Lim et al., ICLR 2024)
- :mod:`metanets.unf`: Universal Neural Functionals (Zhou et al., NeurIPS 2024)
- :mod:`metanets.baselines`: StatNN, flat MLP, DeepSets over neurons
- :mod:`metanets.base`: the shared call shape (featurize, collate, forward, embed)

Submodules are imported on use (``from metanets.gmn import GMN``) so that importing one does not pull in
torch_geometric for the others.
"""
