"""Model alignment on plain state dicts: permutation symmetries, Git Re-Basin, ZipIt!."""

from .permspec import apply_permutation, perm_spec, random_permutation
from .rebasin import activation_matching, align, weight_matching
from .zipit import zipit

__all__ = ["activation_matching", "align", "apply_permutation", "perm_spec", "random_permutation", "weight_matching", "zipit"]
