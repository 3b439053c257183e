"""evomerge: evolutionary search for model-merge recipes.

The Python API (evomerge/api.py): ``evomerge.merge``, ``evomerge.evaluate``,
``evomerge.search``, ``evomerge.resume`` and ``evomerge.Run``, loaded on first use.
"""

__version__ = "0.1.0"

_API = ("evaluate", "search", "resume", "Run", "merge")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "UserError":
        from .errors import UserError

        return UserError
    raise AttributeError(f"module 'evomerge' has no attribute {name!r}")
