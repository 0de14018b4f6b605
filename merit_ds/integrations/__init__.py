"""Integrations: DeepSpeed, HF Trainer, Accelerate. Glue only, no math.

Submodules are imported on demand (``merit_ds.integrations.hf_trainer`` needs transformers,
``merit_ds.integrations.accelerate`` needs accelerate); importing this package imports neither.
"""
