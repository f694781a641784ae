"""The precomputed store: what the precompute stage writes and distill reads.

Layout under the store URI (a local folder or an s3:// prefix):

    manifest.json             what made the store (teacher, VAE, scales, dtypes, text settings, rows)
    empty_prompt.safetensors  `prompt_embeds` (1, L, D) and `pooled_prompt_embeds` (1, P) for CFG
    data/*.parquet            one row per sample: sample_id, caption, prompt_embeds,
                              pooled_prompt_embeds, latents_<s> for every scale s
    quarantine/*.parquet      inputs that were refused: ref, sample_id, reason, detail

Modules: `manifest` (the manifest and its checks against a definition), `codec` (tensor columns
as bytes), `shards` (the Parquet files), `store` (`Store`, `open_store`, `read_rows`). This
package re-exports their public names: `from pipelines import store; store.open_store(cfg)`.
"""

from pipelines.store.codec import DTYPE_BYTES, column_shapes, decode_numpy, encode_tensor, latent_column
from pipelines.store.manifest import (
    COMPARED,
    MANIFEST,
    VERSION,
    expected_manifest,
    manifest_differences,
    stored_scales,
    teacher_content_hash,
    vae_settings,
)
from pipelines.store.shards import FOOTER_READERS, count_rows, file_rows, list_parquet, read_column, remove_unreadable
from pipelines.store.store import (
    DATA,
    EMPTY_PROMPT,
    QUARANTINE,
    Store,
    StoreMismatchError,
    open_store,
    read_rows,
    save_empty_prompt,
    store_uri,
)

__all__ = [
    "COMPARED", "DATA", "DTYPE_BYTES", "EMPTY_PROMPT", "FOOTER_READERS", "MANIFEST", "QUARANTINE", "VERSION",
    "Store", "StoreMismatchError", "column_shapes", "count_rows", "decode_numpy", "encode_tensor",
    "expected_manifest", "file_rows", "latent_column", "list_parquet", "manifest_differences", "open_store",
    "read_column", "read_rows", "remove_unreadable", "save_empty_prompt", "store_uri", "stored_scales",
    "teacher_content_hash", "vae_settings",
]
