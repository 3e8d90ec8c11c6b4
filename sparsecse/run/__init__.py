"""The run machinery: the stages as plain functions a node runs (`stages`), Ray behind one adapter
(`ray_adapter`, the only module that imports Ray, with Tune's quirks), the run directory's state and the checks
before anything starts (`rundir`, `checks`), stage 1 and scoring on the cluster (`prepare`), evaluation, export and
the report after the trials (`outcome`), the driver that orders them (`sweep`), cost plans (`plan`), experiment
tracking (`tracking`) and one driver per run (`runlock`).

May import: every layer below (`sparsecse`, `core`, `method`, `study`, `ops`). Only `sparsecse.cli` sits above.
"""
