"""Reading user YAML files into validated pydantic models, with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .errors import UserError

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path, what: str) -> Any:
    """``yaml.safe_load`` of a file; missing files and syntax errors become UserErrors."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {str(path)!r} not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{path}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None


def validate(model: type[M], data: Any, where: str) -> M:
    """``model.model_validate`` whose first error becomes one line: 'where: field.path: message'."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or model.__name__
        raise UserError(f"{where}: {loc}: {err['msg'].removeprefix('Value error, ')}") from None
