"""Benchmark harnesses of proto_segformer (not part of the installed library): speed (`speed.py`), quality
(`quality.py`, `run_quality.py`), adding classes (`add_classes.py`), the metric (`metric.py`), their arguments
(`arguments.py`); entry points in scripts/benchmark*.py, results (JSON) in this folder."""
