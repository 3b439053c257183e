"""lm-eval's HF model wrapper with a vectorized log-likelihood path.

A search scores thousands of candidates of small models, where lm-eval's per-request
Python work (tokenizing every request again, slicing logits request by request)
costs several times the forward passes. ``FastHFLM`` keeps lm-eval's requests, batching
order and numerics (same padded inputs, same log_softmax) but tokenizes each
(context, continuation) pair once per worker and reads every request's log-likelihood
and greedy match out of a batch with a few tensor ops. Scores equal stock lm-eval's
(tests compare against the `lm_eval` CLI).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM


class FastHFLM(HFLM):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pairs: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # lm-eval passes disable=False to its per-call "Tokenizing inputs" bar, which overrides
        # TQDM_DISABLE; a search makes thousands of calls and shows its own progress
        return super().loglikelihood(requests, disable_tqdm=True)

    def _encode_pair(self, context: str, continuation: str):
        key = (context, continuation)
        if key not in self._pairs:
            self._pairs[key] = super()._encode_pair(context, continuation)
        return self._pairs[key]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.backend != "causal" or not isinstance(self.batch_size, int):
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        # lm-eval's order: longest first, so a batch pads to its first row
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list = [None] * len(requests)
        size = override_bs or self.batch_size
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            for i, answer in zip(idx, self._score_batch([requests[i] for i in idx])):
                results[i] = answer
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results

    def _score_batch(self, batch) -> list[tuple[float, bool]]:
        # max_length is a property that resolves the model's config on every read: read once (read
        # per row, and the tensors below built row by row, were ~5 % of a toy zoo evaluation)
        keep = self.max_length + 1
        seqs = [(ctx + cont)[-keep:] for _, ctx, cont in batch]
        conts = [cont for _, _, cont in batch]
        width = max(len(s) - 1 for s in seqs)
        # one tensor per batch from padded lists, padding 0
        inputs = torch.tensor([s[:-1] + [0] * (width - len(s) + 1) for s in seqs], dtype=torch.long)
        logprobs = F.log_softmax(self._model_call(inputs.to(self.device)), dim=-1, dtype=self.softmax_dtype)
        # continuation token j of row r sits at input position inplen - contlen + j
        longest = max(len(c) for c in conts)
        pos = torch.tensor([list(range(len(s) - 1 - len(c), len(s) - 1)) + [0] * (longest - len(c))
                            for s, c in zip(seqs, conts)], dtype=torch.long)
        target = torch.tensor([c + [0] * (longest - len(c)) for c in conts], dtype=torch.long)
        valid = torch.arange(longest) < torch.tensor([len(c) for c in conts]).unsqueeze(1)
        pos, target, valid = pos.to(logprobs.device), target.to(logprobs.device), valid.to(logprobs.device)
        rows = logprobs.gather(1, pos.unsqueeze(-1).expand(-1, -1, logprobs.shape[-1]))
        picked = rows.gather(2, target.unsqueeze(-1)).squeeze(-1)
        ll = (picked * valid).sum(dim=1)
        greedy = ((rows.argmax(dim=-1) == target) | ~valid).all(dim=1)
        return [(float(a), bool(b)) for a, b in zip(ll.tolist(), greedy.tolist())]
