"""Pass 1 of the precompute stage: decode each input row, test its image and caption, and hash it
into its `sample_id`. A row that cannot be used is refused with one of `REASONS`."""

from __future__ import annotations

import hashlib
import io
import unicodedata
from functools import lru_cache

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines.stages.precompute.spec import EncodeSpec

# Why a row is refused (the quarantine's `reason` column).
REASONS = ("missing_image", "bad_path", "outside_source", "not_a_file", "unreadable", "undecodable_image", "too_small",
           "caption_not_text", "empty_caption", "caption_too_long", "check_failed", "duplicate")


class Refused(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def sample_id(image: bytes | None, caption: str | None) -> str:
    """Stable content hash of (image bytes, caption); length-prefixed so the parts cannot blur."""
    h = hashlib.sha256()
    text = caption if isinstance(caption, str) else ""
    for part in (image if isinstance(image, bytes) else b"", text.encode("utf-8", "surrogatepass")):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:32]


def stored_caption(caption):
    """What the store keeps of a caption (and hashes into sample_id): the text without control
    characters. Anything else (None, a number) is passed through for the checks to refuse."""
    return clean_caption(caption)[0] if isinstance(caption, str) else caption


def load_rgb(data: bytes) -> tuple[np.ndarray, str | None]:
    """Image bytes -> uint8 RGB (H, W, 3) and what was converted (None when it was plain RGB).

    Greyscale, palette, CMYK become RGB; transparency is composited on white (what a viewer
    shows); 16-bit images are scaled to 8 bits rather than clipped."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()  # decode now: truncated files fail here, not later
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds for corrupt input
        raise Refused("undecodable_image", f"{type(err).__name__}: {err}") from None
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im), None
    if mode.startswith("I"):  # 16/32-bit integer greyscale
        arr = np.asarray(im).astype(np.float64)
        arr = arr / 257.0 if (mode.startswith("I;16") or arr.max() > 255) else arr
        grey = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2), f"{mode} (16-bit) -> RGB"
    if mode == "F":
        grey = np.clip(np.asarray(im), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2), "F -> RGB"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB")), f"{mode} -> RGB on white"
    return np.asarray(im.convert("RGB")), f"{mode} -> RGB"


@lru_cache(maxsize=4)
def caption_limit(teacher: str, max_sequence_length: int, family: str = "sd3"):
    """(tokenizer, token limit) deciding an over-long caption: the longest window any text
    encoder sees — T5's `max_sequence_length` when the teacher has T5, else CLIP's. T5 is
    SD3's third tokenizer and FLUX's second."""
    import json

    from transformers import AutoTokenizer

    from swd_core.adapters import FAMILIES
    from swd_core.pretrained import pretrained_folder

    # a local folder, or a Hub repo's snapshot (the Hub cache first): which tokenizers it ships
    path = pretrained_folder(teacher, ["model_index.json", "tokenizer*/*"])
    index = path / "model_index.json"
    t5 = FAMILIES[family].t5_tokenizer
    has_t5 = index.exists() and (json.loads(index.read_text()).get(t5) or [None])[0] is not None
    if has_t5 and max_sequence_length > 0:
        tok = AutoTokenizer.from_pretrained(path, subfolder=t5)
        return tok, max_sequence_length
    tok = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    return tok, int(tok.model_max_length)


LONG_CAPTIONS = ("truncate", "quarantine")  # DataSource.long_captions


def clean_caption(caption: str) -> tuple[str, int]:
    """The caption without control characters (NUL, ESC, DEL, C1 ...) and how many there were.
    Whitespace ones (tab, newline) stay: the tokenizers read them as spaces."""
    if caption.isprintable():  # the common case, no scan
        return caption, 0
    kept = [ch for ch in caption if ch.isspace() or unicodedata.category(ch) != "Cc"]
    return "".join(kept), len(caption) - len(kept)


def check_row(image: bytes | None, caption: str | None, missing: str | None, spec: EncodeSpec,
              long_captions: str = "truncate", notes: dict | None = None) -> str | None:
    """Raise `Refused` for a row that cannot be used; return the conversion note otherwise.
    `notes` (when given) receives `truncated` (the caption is longer than the text window and
    `long_captions` is "truncate") and `control_characters` (how many were removed)."""
    if image is None:
        reason, _, detail = (missing or "").partition(": ")
        if reason in ("bad_path", "outside_source", "not_a_file", "unreadable"):
            raise Refused(reason, detail)
        raise Refused("missing_image", missing or "no image")
    if caption is not None and not isinstance(caption, str):
        raise Refused("caption_not_text", f"the caption is a {type(caption).__name__} ({caption!r:.40}), not text")
    removed = 0
    if caption is not None:
        caption, removed = clean_caption(caption)
        if notes is not None:
            notes["control_characters"] = removed
    if caption is None or not caption.strip():
        raise Refused("empty_caption", "the caption is empty" + (" without its control characters" if removed else ""))
    if long_captions not in LONG_CAPTIONS:
        raise ValueError(f"long_captions must be one of {LONG_CAPTIONS}, got {long_captions!r}")
    tok, limit = caption_limit(spec.teacher, spec.max_sequence_length, spec.family)
    n = len(tok(caption.strip())["input_ids"])
    if n > limit:
        if long_captions == "quarantine":
            raise Refused("caption_too_long", f"{n} tokens, the text encoder sees {limit}")
        if notes is not None:  # the text encoders keep the first `limit` tokens (as diffusers does)
            notes["truncated"] = True
    rgb, converted = load_rgb(image)
    h, w = rgb.shape[:2]
    if min(h, w) < spec.min_side:
        raise Refused("too_small", f"{w}x{h} px; the largest scale {max(spec.scales)} needs "
                                   f"{spec.min_side}x{spec.min_side} (scale x VAE factor {spec.downsample})")
    return converted


CHECK_SCHEMA = pa.schema([("ref", pa.string()), ("order", pa.int64()), ("sample_id", pa.string()),
                          ("reason", pa.string()), ("detail", pa.string()), ("converted", pa.string()),
                          ("truncated", pa.bool_()), ("control_characters", pa.int64())])


def check_batch(batch: dict, spec: EncodeSpec) -> pa.Table:
    """Pass 1 on a column batch: sample_id, reason/detail (None when usable), conversion note,
    caption notes. `long_captions` is the batch's column when it has one (a source's setting)."""
    out = {"ref": [], "order": [], "sample_id": [], "reason": [], "detail": [], "converted": [], "truncated": [],
           "control_characters": []}
    policies = batch.get("long_captions")
    policies = [None] * len(batch["ref"]) if policies is None else policies
    for ref, order, image, caption, missing, policy in zip(batch["ref"], batch["order"], batch["image"],
                                                            batch["caption"], batch["missing"], policies):
        reason = detail = converted = None
        notes = {"truncated": False, "control_characters": 0}
        try:
            converted = check_row(image, caption, missing, spec, policy or "truncate", notes)
        except Refused as err:
            reason, detail = err.reason, err.detail
        except Exception as err:  # noqa: BLE001 - one row's failure is that row's quarantine, not the job's end
            reason, detail = "check_failed", f"{type(err).__name__}: {err}"
        out["ref"].append(ref)
        out["order"].append(int(order))
        out["sample_id"].append(sample_id(image, stored_caption(caption)))
        out["reason"].append(reason)
        out["detail"].append(detail)
        out["converted"].append(converted)
        out["truncated"].append(bool(notes["truncated"]))
        out["control_characters"].append(int(notes["control_characters"]))
    return pa.table(out, schema=CHECK_SCHEMA)
