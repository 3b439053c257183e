"""`evomerge merge`: a recipe file to a Hugging Face checkpoint, streamed tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import torch
from ..progress import progress_bar

from ..errors import UserError
from ..io import chat_template, vocab
from ..io.model_dir import ModelDir, open_model
from ..io.safetensors_file import StreamingWriter, has_nonfinite
from ..io.writer import atomic_dir, check_out_dir, copy_tokenizer, shard_layout, shard_names, write_json, write_text
from ..recipe import MERGE_SOURCE, Recipe
from .expr import Merge, Read, Vocab
from .kernels import get_kernel
from .prepare import prepare
from .materialize import Plan, compute, plan

DEFAULT_SHARD_BYTES = 5 * 2**30


def resolve_model_path(ref: str, recipe_dir: Path | None) -> Path:
    """Model references are local paths: as given (cwd-relative), else relative to the recipe's folder."""
    p = Path(ref).expanduser()
    if p.is_dir() or p.is_absolute() or recipe_dir is None:
        return p
    alt = recipe_dir / p
    return alt if alt.is_dir() else p


def with_data_paths(recipe: Recipe, recipe_dir: Path | None) -> Recipe:
    """Calibration files found as model directories are: as given, else beside the recipe."""
    def fix(cal):
        if cal is None or not cal.data:
            return cal
        p = Path(cal.data).expanduser()
        alt = recipe_dir / p if recipe_dir is not None and not p.is_absolute() else p
        return cal if p.is_file() or not alt.is_file() else cal.model_copy(update={"data": str(alt)})

    models = [m.model_copy(update={"calibration": fix(m.calibration)}) for m in recipe.models or []]
    return recipe.model_copy(update={"calibration": fix(recipe.calibration), "models": models or recipe.models})


def open_sources(recipe: Recipe, recipe_dir: Path | None = None) -> dict[str, ModelDir]:
    return {ref: open_model(ref, lambda p: resolve_model_path(p, recipe_dir)) for ref in recipe.model_refs()}


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"unknown device {device!r}; use cpu or cuda")


def describe(p: Plan, sources: dict[str, ModelDir]) -> str:
    gib = 2**30
    lines = [f"sources ({len(sources)}):"]
    for ref, s in sources.items():
        if hasattr(s, "arch"):
            lines.append(f"  {ref}: {s.arch.model_type}, {s.arch.num_layers} layers, {s.nbytes / gib:.2f} GiB")
        else:  # a model's statistics for a data-dependent method (merge/prepare.py)
            lines.append(f"  {ref}: {s.path}")
    merged = sum(1 for o in p.outputs if isinstance(o.expr, (Merge, Vocab)) or o.expr == Read(MERGE_SOURCE, getattr(o.expr, "name", None)))
    lines.append(f"output: {len(p.outputs)} tensors ({merged} merged, {len(p.outputs) - merged} copied), {p.nbytes / gib:.2f} GiB")
    lines.append(f"peak memory estimate: {p.peak_bytes(sources) / gib:.2f} GiB working set beyond the interpreter (streamed per tensor)")
    lines.append(f"tokenizer from: {p.tokenizer_source}")
    return "\n".join(lines)


def merge_to_disk(recipe: Recipe, out_dir: str | Path, *, recipe_dir: Path | None = None, device: str = "cpu",
                  seed: int | None = None, force: bool = False, dry_run: bool = False,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
                  extra_files: dict[str, str] | None = None) -> Plan:
    """Write the recipe's result as an HF dir; ``extra_files`` (name -> text) are written
    inside the same atomic directory (a soup's log, say), so they land with the weights."""
    out_dir = Path(out_dir)
    check_device(device)
    if not dry_run:
        check_out_dir(out_dir, force)
    opened = open_sources(recipe, recipe_dir)
    vplan = vocab.build(recipe, opened)
    if vplan is not None and recipe.merge_method and get_kernel(recipe.merge_method).stats:
        raise UserError(f"{recipe.merge_method}'s statistics are per row of each model's own vocabulary; a tokenizer "
                        "choice that re-indexes rows does not combine with it (merge models of one vocabulary)")
    planned, sources = prepare(with_data_paths(recipe, recipe_dir), opened, device)
    p = plan(planned, sources, seed=seed, vocab=vplan)
    if dry_run:
        print(describe(p, sources))
        return p
    tok_dir = sources[vplan.copy_from if vplan is not None and vplan.copy_from else p.tokenizer_source].path
    if (vplan is None or vplan.copy_from is not None) and not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer.model").is_file() and not (tok_dir / "vocab.json").is_file():
        raise UserError(f"{tok_dir}: no tokenizer files to copy; set tokenizer_source to a model that has them")

    template = chat_template.resolve(recipe.chat_template, [sources[r].path for r in recipe.model_refs() if r in sources])

    recipe_yaml = recipe.to_yaml() if seed is None else recipe.model_copy(update={"seed": seed}).to_yaml()
    by_name = {o.name: o for o in p.outputs}
    groups = shard_layout([(o.name, o.nbytes) for o in p.outputs], max_shard_bytes)
    files = shard_names(len(groups))

    def get(read):
        if read.source == MERGE_SOURCE:  # a routed slot of the recipe's own merge
            return compute(p.ps_outputs[read.name], get, device)
        t = sources[read.source].get(read.name)
        if has_nonfinite(t):
            raise UserError(f"{read.source}: tensor {read.name} holds NaN or Inf; the source checkpoint is broken")
        return t

    with atomic_dir(out_dir, force) as tmp, progress_bar(total=p.nbytes, unit="B", unit_scale=True, desc="merge", disable=not progress) as bar:
        for fname, names in zip(files, groups):
            layout = [(n, by_name[n].dtype, by_name[n].shape) for n in names]
            with StreamingWriter(tmp / fname, layout, metadata={"format": "pt", "evomerge_recipe": recipe_yaml}) as w:
                for n in names:
                    w.write(n, compute(by_name[n], get, device))
                    bar.update(by_name[n].nbytes)
        if len(files) > 1:
            write_json(tmp / "model.safetensors.index.json", {
                "metadata": {"total_size": p.nbytes},
                "weight_map": {n: f for f, names in zip(files, groups) for n in names},
            })
        write_json(tmp / "config.json", p.config)
        if vplan is not None and vplan.copy_from is None:
            vplan.tokenizer.save_pretrained(tmp)  # a vocabulary no model has as it is: built (io/vocab.py)
        else:
            copy_tokenizer(tok_dir, tmp)
        if template is not None:
            chat_template.write(tmp, template)
        write_text(tmp / "evomerge_recipe.yaml", recipe_yaml)
        for name, text in (extra_files or {}).items():
            write_text(tmp / name, text)
    return p
