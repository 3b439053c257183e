"""The shipped lm-eval tasks: their YAMLs and data live in this package, so that a
non-editable install (``pip install .``) carries them too; ``TASK_DIR`` is the folder
to hand lm-eval as its include path."""

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
