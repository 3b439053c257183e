"""Tied embeddings: which output head a merge writes, and what a tied source gives for it.

A model that ties its output head to its input embeddings (Qwen2-0.5B, GPT-2, Gemma)
stores no head tensor; its head *is* its embedding matrix. mergekit 0.1.5 declares the
head optional with the embedding as its tied name, and evomerge follows it:

- the head is written when any model of the last slice stores one; for a model that
  stores none, its embedding matrix stands in (parameters are still looked up under the
  head's name, so a filter on ``lm_head`` applies to it);
- the output config is the base model's (or the first model's), tie_word_embeddings
  included.

So all tied: no head, a tied config. All untied: the heads merge. An untied base with
tied sources: a head merged from the base's head and the sources' embeddings, under
the base's untied config. Two cases are refused (``UserError``) instead of written as
mergekit writes them: an untied base whose last slice holds only tied models (mergekit
writes no head under an untied config: a model with a randomly initialized head), and
a *tied* base with a source that has its own head (mergekit writes the merged head
under a config that still says tie_word_embeddings: true, and a loader that honours
that flag drops the head, the source's included, without a word; transformers 5
happens to keep it, with a warning).
"""

from __future__ import annotations

from typing import Mapping

from ..errors import UserError

HEADS = ("lm_head.weight", "embed_out.weight")
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")


def tied_embedding(source, name: str) -> str | None:
    """The tensor ``source`` reads for the head ``name`` when it ties its head to its input
    embeddings (stores no head), else None."""
    if name not in HEADS or name in source:
        return None
    found = [n for n in source.entries if n.endswith(_EMBEDDING_SUFFIXES) and source.arch.split(n) is None]
    return found[0] if len(found) == 1 else None


def head_names(ref_name: str, ref, last_slice: Mapping[str, object]) -> list[str]:
    """The heads the merge writes, given the model its config comes from (``ref``) and the
    models of the last slice (name -> source); raises for the two refused cases above."""
    stored = {h for h in HEADS for src in last_slice.values() if h in src}
    for head in HEADS:
        if head in ref and head not in stored:
            raise UserError(
                f"{ref_name} has its own {head} but every model of the last slice ties its head to its embeddings: "
                f"the merge would have no head under an untied config (mergekit 0.1.5 writes exactly that); "
                f"take the last layers from a model with its own {head}, or untie those models first")
    for head in sorted(stored):
        if head not in ref and tied_embedding(ref, head) is not None:
            untied = next(name for name, src in last_slice.items() if head in src)
            raise UserError(
                f"{ref_name} ties its output head to its embeddings but {untied} has its own {head}: the merged head "
                f"would sit under a config saying tie_word_embeddings: true, which loaders may drop; untie the base first "
                f"(save it with tie_word_embeddings: false and {head} = a copy of its embeddings)")
    return sorted(stored)
