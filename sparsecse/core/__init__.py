"""The ground every other layer stands on: the typed config (`config`), the one shape of a grid point and a trial's
result and the metric names (`results`), atomic files and manifests (`io`), a run's files on any filesystem
(`storage`), data and models staged in storage (`staging`), the checkpoint policy and its file names
(`checkpoints`), the output rule every command follows (`outputs`), downloads (`fetch`) and the one table renderer
(`tables`). Plain Python, pyarrow and yaml: no torch, no Ray.

May import: `sparsecse` (errors, version) and other `core` modules only.
"""
