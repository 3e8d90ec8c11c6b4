"""The method, SparseCSE on top of SimCSE, as plain torch: the data (`data`), the encoder with its head and neuron
masks as hooks (`model`; `packed`: each family's Adapter and the padding-free forward; `pruned_modeling`: the
physically smaller model that ships inside exports, with `packed`), the losses (`losses`), training (`train`), importance scores (`score`), masks, rewinding and
physical pruning (`prune`), STS evaluation (`evaluate`) and the transfer tasks (`transfer`, with its batched
classifier in `classifier`). Nothing here knows about Ray, a run directory or a report.

May import: `sparsecse` and `core`.
"""
