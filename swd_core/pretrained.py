"""Files of a pretrained pipeline by its `teacher.path`: a local folder, a `builtin:` spec or a
Hugging Face Hub id, read without loading the pipeline (and, for a Hub id, from the Hub cache
first). Light to import: plan-time checks use it."""

from __future__ import annotations

from pathlib import Path


def pretrained_file(path: str, name: str, download: bool = True) -> Path | None:
    """The file `name` (e.g. "model_index.json") of the pipeline `path`: in a local folder (or a
    `builtin:` one), else in the Hub repo `path`, from the local Hub cache (HF_HOME) first and,
    with `download`, from the Hub. None when the pipeline has no such file; without `download`,
    also when the cache does not hold it (nothing goes to the network)."""
    if str(path).startswith("builtin:"):
        from swd_core.tiny_models import resolve_pretrained

        path = resolve_pretrained(path)
    folder = Path(path)
    if folder.is_dir():
        return folder / name if (folder / name).exists() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        cached = try_to_load_from_cache(str(path), name)
    except HFValidationError:  # not a repo id either (e.g. a missing local folder)
        return None
    if isinstance(cached, str):
        return Path(cached)
    if not download:
        return None
    try:
        return Path(hf_hub_download(str(path), name))
    except EntryNotFoundError:
        return None
