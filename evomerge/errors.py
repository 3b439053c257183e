"""The one exception type a user can cause.

The CLI turns a ``UserError`` into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it, on one line."""


def nearest(name: str, choices) -> str:
    """' (did you mean X?)' for the closest of ``choices``, or '' when none is close."""
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""
