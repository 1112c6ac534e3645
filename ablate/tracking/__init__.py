"""Tracking: MLflow through ``MlflowClient`` with explicit run ids.

``client`` (the tracker, store checks, metric batches, links), ``runs`` (the trainer's epochs
logged as MLflow runs, one per member of an array) and ``checkpoints`` (when and where a running
trial is checkpointed: its run's artifacts).
"""
