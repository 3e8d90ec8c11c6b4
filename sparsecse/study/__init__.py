"""The study above the trials: pure decisions over trial results (`select`: the choice, the control, comparisons,
stability, allocation), statistics (`stats`: paired tests, the bootstrap, multiplicity corrections), the pilot
study (`pilot`), and renderers that turn those decisions into figures (`figures`) and report.md / report.html
(`report`) without deciding anything themselves.

May import: `sparsecse`, `core` and `method`.
"""
