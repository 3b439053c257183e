"""Deterministic examples for the toy zoo: skills, text formats, eval splits, training batches.

Three skills, each on its own alphabet: ``mir`` mirrors letters a-h (a<->h, b<->g, ...),
``sft`` adds 1 mod 10 to each digit, ``srt`` sorts letters q-x.

The base knows every skill already, as a pretrained model knows what its fine-tunes will
ask of it: in a verbose format (``mir abh=hga``) and in the short format under an alias tag
(``m:abh>hga``). The lm-eval tasks ask in the short format under another tag, the skill's
own (``k:abh>``), which the base was taught means "copy" (every free tag does), so the base
fails them. A specialist rebinds its own tag to its skill (``k:abh>hga``), and keeps the
rest (replay of the base mixture, copy on every other tag included). That change is small
and mostly its own, so task vectors add up in a merge; but only most of it is its own, so
how they are added decides how much of each skill survives.

The eval splits come from a fixed seed, independent of the zoo seed, and their inputs are
never shown with a skill's answer in training: the committed ``evomerge/tasks/data/*.jsonl``
files are ``write_task_data(...)``'s output, and a test checks they still match.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

EVAL_SEED = 20240611  # fixed: the task files must not depend on the zoo seed
EVAL_SIZE = 200  # examples per skill and split
MIN_LEN, MAX_LEN = 3, 5  # input string lengths, inclusive
SPLITS = ("search", "test")


@dataclass(frozen=True)
class Skill:
    """One string operation with its two spellings and its own input alphabet."""

    name: str
    verbose_tag: str
    short_tag: str
    alphabet: str
    apply: Callable[[str], str]
    alias_tag: str = ""  # the short tag the base knows this skill under (zoo skills only)

    def verbose(self, x: str) -> str:
        return f"{self.verbose_tag} {x}={self.apply(x)}"

    def short_prompt(self, x: str) -> str:
        return f"{self.short_tag}:{x}>"

    def short(self, x: str) -> str:
        return self.short_prompt(x) + self.apply(x)

    def alias(self, x: str) -> str:
        return f"{self.alias_tag}:{x}>{self.apply(x)}"


_MIRROR = str.maketrans("abcdefgh", "hgfedcba")  # a<->h, b<->g, ...


def _shift(x: str) -> str:
    return "".join(str((int(c) + 1) % 10) for c in x)


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        # A short tag is no verbose tag's initial, nor in any alphabet: a base that read
        # "s:" as "sft", or "m:" as "mir", would half know that skill under the tasks' tag.
        Skill("mir", "mir", "k", "abcdefgh", lambda x: x.translate(_MIRROR), alias_tag="m"),
        Skill("sft", "sft", "n", "0123456789", _shift, alias_tag="p"),
        Skill("srt", "srt", "o", "qrstuvwx", lambda x: "".join(sorted(x)), alias_tag="z"),
    )
}
ANY_ALPHABET = ""  # a general skill: each example draws one of the skills' alphabets
# General skills the base knows in both formats, over every alphabet: with them the base has
# already learned that a short tag names an operation, so a specialist only binds its own
# tag to its own operation. Without them each specialist also learns "short format means
# operate", the same change three times over, and task arithmetic overshoots.
GENERAL: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("rol", "rol", "l", ANY_ALPHABET, lambda x: x[1:] + x[0]),
        Skill("ror", "ror", "i", ANY_ALPHABET, lambda x: x[-1] + x[:-1]),
    )
}
# Copying, too, runs over the skills' alphabets, so the short format exists in the base for
# every input the tasks will show. Every tag that names no operation is a copy tag, the
# skills' own tags included: the base copies on the tasks' prompts, and a specialist has to
# rebind its tag (its task vector must beat copying, so a third of it, the uniform merge, does
# not), while its replay keeps copying on the other specialists' tags.
COPY = Skill("cpy", "cpy", "c", ANY_ALPHABET, lambda x: x)
_NAMED = {s.short_tag for s in GENERAL.values()} | {s.alias_tag for s in SKILLS.values()}
COPY_TAGS = "".join(c for c in "abcdefghijklmnopqrstuvwxyz" if c not in _NAMED)
SKILL_TAGS = {s.short_tag: name for name, s in SKILLS.items()}
CHARSET = " :=>0123456789abcdefghijklmnopqrstuvwxyz"  # every character any example uses


def random_input(rng: np.random.Generator, alphabet: str) -> str:
    n = int(rng.integers(MIN_LEN, MAX_LEN + 1))
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=n))


@cache
def _eval_inputs(skill: str) -> tuple[str, ...]:
    """2 * EVAL_SIZE distinct inputs: the first half is the search split, the rest the test split."""
    rng = np.random.default_rng([EVAL_SEED, sorted(SKILLS).index(skill)])
    seen: dict[str, None] = {}  # ordered set
    while len(seen) < 2 * EVAL_SIZE:
        seen.setdefault(random_input(rng, SKILLS[skill].alphabet))
    return tuple(seen)


def eval_examples(skill: str, split: str) -> list[dict[str, str]]:
    """The lm-eval docs of one skill and split: ``{"input", "prompt", "answer"}``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    inputs = _eval_inputs(skill)
    half = inputs[:EVAL_SIZE] if split == "search" else inputs[EVAL_SIZE:]
    s = SKILLS[skill]
    return [{"input": x, "prompt": s.short_prompt(x), "answer": s.apply(x)} for x in half]


@cache
def _held_out() -> frozenset[str]:
    return frozenset(x for name in SKILLS for x in _eval_inputs(name))


class Component(NamedTuple):
    """One kind of training example: a skill of SKILLS or GENERAL, or "cpy", in a format."""

    name: str
    fmt: str  # "verbose", "short" (the skill's own tag) or "alias" (the base's tag for a zoo skill)
    skip: str = ""  # copy in the short format: tags it never draws (the ones a model binds to a skill)


BASE_MIXTURE: tuple[tuple[Component, float], ...] = (
    *((Component(name, "alias"), 0.12) for name in SKILLS),
    *((Component(name, "verbose"), 0.08) for name in SKILLS),
    (Component("cpy", "short"), 0.15),
    (Component("cpy", "verbose"), 0.05),
    *((Component(name, fmt), 0.05) for fmt in ("short", "verbose") for name in GENERAL),
)


def training_mixture(skills: Sequence[str], own_share: float) -> tuple[tuple[Component, float], ...]:
    """``skills`` in the short format (``own_share`` in all), the rest replay of the base mixture,
    whose copying then never uses those skills' tags."""
    tags = "".join(SKILLS[s].short_tag for s in skills)
    replay = tuple((c._replace(skip=tags) if c == ("cpy", "short", "") else c, w * (1.0 - own_share)) for c, w in BASE_MIXTURE)
    return tuple((Component(s, "short"), own_share / len(skills)) for s in skills) + replay


def specialist_mixture(skill: str, own_share: float = 0.5) -> tuple[tuple[Component, float], ...]:
    """Own skill in the short format, the rest replay of the base mixture (keeps the base's skills)."""
    return training_mixture([skill], own_share)


def _skill(name: str) -> Skill:
    return COPY if name == COPY.name else SKILLS.get(name) or GENERAL[name]


def _any_alphabet(rng: np.random.Generator) -> str:
    return SKILLS[sorted(SKILLS)[int(rng.integers(len(SKILLS)))]].alphabet


def _input(rng: np.random.Generator, alphabet: str, hide: bool) -> str:
    """A random input; with ``hide``, never a held-out one (the example would show its answer)."""
    while True:
        x = random_input(rng, alphabet)
        if not hide or x not in _held_out():
            return x


def sample_text(rng: np.random.Generator, component: Component) -> str:
    name, fmt, skip = component
    if name == COPY.name and fmt == "short":
        tags = "".join(t for t in COPY_TAGS if t not in skip)
        tag = tags[int(rng.integers(len(tags)))]
        # copying on a skill's tag shows a held-out sorted input with its sorted answer
        x = _input(rng, _any_alphabet(rng), hide=tag in SKILL_TAGS)
        return f"{tag}:{x}>{x}"
    skill = _skill(name)
    x = _input(rng, skill.alphabet or _any_alphabet(rng), hide=name in SKILLS)
    return {"verbose": skill.verbose, "short": skill.short, "alias": skill.alias}[fmt](x)


def sample_batch(
    rng: np.random.Generator, mixture: Sequence[tuple[Component, float]], size: int
) -> list[str]:
    weights = np.array([w for _, w in mixture], dtype=float)
    picks = rng.choice(len(mixture), size=size, p=weights / weights.sum())
    return [sample_text(rng, mixture[int(i)][0]) for i in picks]


def task_data_files() -> dict[str, list[dict[str, str]]]:
    """File name (``<skill>_<split>.jsonl``) -> its docs, for every skill and split."""
    return {
        f"{skill}_{split}.jsonl": eval_examples(skill, split)
        for skill in SKILLS
        for split in SPLITS
    }


def render_jsonl(docs: list[dict[str, str]]) -> str:
    return "".join(json.dumps(d, sort_keys=True) + "\n" for d in docs)


def write_task_data(data_dir: str | Path) -> list[Path]:
    """Write every split's jsonl under ``data_dir`` (the shipped ``evomerge/tasks/data``)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, docs in task_data_files().items():
        path = data_dir / name
        path.write_text(render_jsonl(docs), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    import sys

    from evomerge.tasks import TASK_DIR

    target = sys.argv[1] if len(sys.argv) > 1 else TASK_DIR / "data"
    for p in write_task_data(target):
        print(p)
