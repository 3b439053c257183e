"""Layer discovery: which tensors belong to which transformer block.

Found from the tensor names (``<prefix>.<i>.<rest>``) and checked against the
config's layer count, so Llama, Mistral, Qwen2/3, Gemma, Phi-3 and GPT-2
naming all work without a per-architecture table of tensor names. The only
per-architecture fact is which projections write into the residual stream,
which DFS folding needs.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from ..errors import UserError

_LAYER_RE = re.compile(r"^(.*?\b(?:layers|h|blocks|layer))\.(\d+)\.(.+)$")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

# Pre-norm blocks: each sub-block reads norm(x), so scaling x by c and dividing
# these residual-writing projections by c leaves the function unchanged.
_RESIDUAL_WRITERS = {
    "llama": ("self_attn.o_proj.", "mlp.down_proj."),
    "mistral": ("self_attn.o_proj.", "mlp.down_proj."),
    "qwen2": ("self_attn.o_proj.", "mlp.down_proj."),
    "qwen3": ("self_attn.o_proj.", "mlp.down_proj."),
    "gemma": ("self_attn.o_proj.", "mlp.down_proj."),
    "phi3": ("self_attn.o_proj.", "mlp.down_proj."),
    "gpt2": ("attn.c_proj.", "mlp.c_proj."),
}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    layer_prefix: str  # e.g. "model.layers"
    num_layers: int
    layer_count_key: str
    vocab_size: int | None

    @classmethod
    def from_config(cls, config: dict, tensor_names, where: str) -> "Architecture":
        model_type = str(config.get("model_type", "unknown"))
        key = next((k for k in _LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
        if key is None:
            raise UserError(f"{where}: config.json has no layer count ({' / '.join(_LAYER_COUNT_KEYS)}); only plain decoder-only models are supported")
        prefixes = Counter(m.group(1) for n in tensor_names if (m := _LAYER_RE.match(n)))
        if not prefixes:
            raise UserError(f"{where}: no transformer blocks found in the tensor names (expected '<prefix>.layers.<i>.' or '<prefix>.h.<i>.')")
        prefix = prefixes.most_common(1)[0][0]
        indices = {int(m.group(2)) for n in tensor_names if (m := _LAYER_RE.match(n)) and m.group(1) == prefix}
        n = config[key]
        if indices != set(range(n)):
            raise UserError(f"{where}: config.json says {n} layers but the weights hold blocks {min(indices)}..{max(indices)} ({len(indices)} of them); the checkpoint is incomplete")
        return cls(model_type, prefix, n, key, config.get("vocab_size"))

    def split(self, name: str) -> tuple[int, str] | None:
        """(layer index, name within the layer) for a block tensor, else None."""
        m = _LAYER_RE.match(name)
        if m is None or m.group(1) != self.layer_prefix:
            return None
        return int(m.group(2)), m.group(3)

    def layer_tensor(self, index: int, rest: str) -> str:
        return f"{self.layer_prefix}.{index}.{rest}"

    @property
    def residual_writers(self) -> tuple[str, ...]:
        """Name-within-layer prefixes of residual-writing projections; refuses non-pre-norm models."""
        try:
            return _RESIDUAL_WRITERS[self.model_type]
        except KeyError:
            raise UserError(
                f"routing needs a pre-norm transformer whose input scales fold into its weights; "
                f"model_type {self.model_type!r} is not one evomerge knows (known: {', '.join(sorted(_RESIDUAL_WRITERS))})"
            ) from None
