"""Files of a pretrained pipeline by its `teacher.path`: a local folder, a `builtin:` spec or a
Hugging Face Hub id, read without loading the pipeline (and, for a Hub id, from the Hub cache
first, so a pod with a staged cache and HF_HUB_OFFLINE=1 reads it). Light to import: plan-time
checks use it."""

from __future__ import annotations

from pathlib import Path


def pretrained_file(path: str, name: str) -> Path | None:
    """The file `name` (e.g. "transformer/config.json") of the pipeline `path`: in a local folder
    (or a `builtin:` one), else in the Hub repo `path` as the local Hub cache (HF_HOME) holds it.
    None when there is no such file; nothing goes to the network.

    Args:
        path (`str`): a local folder, a `builtin:` spec or a Hub id.
        name (`str`): the file, relative to the pipeline's root.

    Returns:
        `Path`, *optional*: the file, or None.
    """
    if str(path).startswith("builtin:"):
        from swd_core.tiny_models import resolve_pretrained

        path = resolve_pretrained(path)
    folder = Path(path)
    if folder.is_dir():
        return folder / name if (folder / name).exists() else None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(str(path), name)
    except HFValidationError:  # not a repo id either (e.g. a missing local folder)
        return None
    return Path(cached) if isinstance(cached, str) else None


def pretrained_folder(path: str, allow_patterns: list[str]) -> Path:
    """A local folder laid out as the pipeline (model_index.json, tokenizer/, ...): the folder
    itself, a `builtin:` one, or a Hub id's snapshot in the Hub cache, which `allow_patterns` are
    fetched into when the Hub is reachable. Loading from it (`from_pretrained(folder,
    subfolder=...)`) works offline, where loading by the Hub id would look for files the
    staging never fetched (e.g. a tokenizer folder's config.json).

    Args:
        path (`str`): a local folder, a `builtin:` spec or a Hub id.
        allow_patterns (`list[str]`): for a Hub id, the files to fetch (glob patterns).

    Returns:
        `Path`: the folder.
    """
    if str(path).startswith("builtin:"):
        from swd_core.tiny_models import resolve_pretrained

        path = resolve_pretrained(path)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path), allow_patterns=allow_patterns))


def use_pil_image_processors() -> None:
    """Without torchvision, binds transformers' `CLIPImageProcessor` and `SiglipImageProcessor`
    to their PIL classes (`…Pil`), as the transformers warning asks. diffusers' SD3 and FLUX
    pipeline modules import both names (for IP-Adapter image encoders, which SwD never loads);
    unbound, transformers 5 substitutes the same PIL classes with a warning in every process that
    imports such a module. Call before importing a diffusers pipeline."""
    import sys

    import transformers
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    names = ("CLIPImageProcessor", "SiglipImageProcessor")
    classes = {name: getattr(transformers, f"{name}Pil") for name in names}
    module = sys.modules["transformers"]  # loading the classes can rebuild transformers' lazy module
    for name, cls in classes.items():
        setattr(module, name, cls)
