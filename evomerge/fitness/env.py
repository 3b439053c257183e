"""The offline environment for lm-eval and datasets.

``datasets`` and ``huggingface_hub`` read these variables when they are first imported,
so this must run before either is: the evaluator module calls it at import, before its
own ``import lm_eval``; Ray workers import that module, so they get it too.
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # The Rust tokenizers' thread pool deadlocks after fork (Ray, DataLoader workers).
    "TOKENIZERS_PARALLELISM": "false",
}


def set_offline_env() -> None:
    """Set the offline variables (overriding the caller's: no network at run time)."""
    os.environ.update(OFFLINE_ENV)

# Library progress bars (lm-eval per evaluation, transformers' "Loading weights" per model)
# drown our own and clutter one-line errors; ours pass `disable=` explicitly, which these
# defaults do not override. transformers reads its variable when it is first imported.
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def set_quiet_env() -> None:
    """Silence library progress bars unless the caller chose otherwise."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)

