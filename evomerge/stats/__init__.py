"""Data-dependent statistics of one model, for the merges that weight by them.

``calibration`` turns a JSONL file or an lm-eval task into token batches, ``gram``
collects each linear layer's input Gram matrix (RegMean), ``fisher`` the diagonal
Fisher information (Fisher merging), and ``cache`` keys both by what they depend on
and keeps them as safetensors files: ``fisher_stats`` and ``gram_stats`` are the entry
points.
"""

from evomerge.fitness.env import set_offline_env

set_offline_env()  # before transformers / lm_eval pull in huggingface_hub and datasets

from evomerge.stats.cache import fisher_stats, gram_stats  # noqa: E402
from evomerge.stats.calibration import CalibrationSpec  # noqa: E402

__all__ = ["CalibrationSpec", "fisher_stats", "gram_stats"]
