"""Precompute stage (Ray Data): (image, caption) rows -> text embeddings and VAE latents at every
scale of the schedule -> the store (pipelines/store/).

Two passes over the input, both streamed:
1. check (Ray tasks, cheap): decode each image, test size and caption, hash it into `sample_id`.
   The driver then decides each row: refused (-> quarantine with the reason), a duplicate of an
   earlier row (-> quarantine), already in the store (skipped: reruns and resumes), or new.
2. encode (an actor pool holding the text encoders and the VAE, never the transformer): the new
   rows -> `data/*.parquet`, appended.
Reading twice costs a second decode of each image, far less than holding every image in the
object store between the passes at real scale.

A run killed midway leaves complete shards (their rows count as done) and perhaps one partial
shard, which the next run deletes; the manifest says `complete: false` until a run finishes.
"""

from pipelines.stages.precompute.checks import (
    REASONS,
    Refused,
    check_batch,
    check_row,
    clean_caption,
    load_rgb,
    sample_id,
    stored_caption,
)
from pipelines.stages.precompute.encoder import Encoder, data_schema, square_pixels, text_shapes
from pipelines.stages.precompute.quarantine import decide, write_quarantine
from pipelines.stages.precompute.spec import EncodeSpec
from pipelines.stages.precompute.stage import all_sources, prepare, run, summary_line, values_manifest, write_manifest

__all__ = ["EncodeSpec", "Encoder", "REASONS", "Refused", "all_sources", "check_batch", "check_row", "clean_caption",
           "data_schema", "decide", "load_rgb", "prepare", "run", "sample_id", "square_pixels", "stored_caption",
           "summary_line", "text_shapes", "values_manifest", "write_manifest", "write_quarantine"]
