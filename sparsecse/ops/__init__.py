"""What users take away and what sets a run up: the export (`export`: dense and physically pruned checkpoints,
model cards), ONNX / ONNX Runtime (`onnx_export`), models published as split zips (`split_models`) and the
Kubernetes submission with its in-cluster check (`k8s`).

May import: `sparsecse`, `core`, `method` and `study`.
"""
