"""The precompute stage's decisions on checked rows (keep, skip, quarantine) and the quarantine
table: refused rows and duplicates with their reason, recorded once across reruns."""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from datetime import UTC, datetime

import pyarrow as pa

from pipelines import store
from pipelines.schema import ResourcesConfig
from pipelines.storage import write_bytes

QUARANTINE_SCHEMA = pa.schema([("quarantine_id", pa.string()), ("ref", pa.string()), ("sample_id", pa.string()),
                               ("reason", pa.string()), ("detail", pa.string()), ("time", pa.string())])


def quarantine_id(ref: str, sid: str, reason: str) -> str:
    return hashlib.sha256(f"{ref}\0{sid}\0{reason}".encode()).hexdigest()[:32]


def _text(value) -> str | None:
    """A check's text field, or None. A batch in which no row has one can reach the driver as a
    float column of NaN (pandas' null), and NaN is truthy: only strings count."""
    return value if isinstance(value, str) and value else None


def decide(checks: pa.Table, present: set[str]) -> tuple[set[str], list[dict], Counter, Counter]:
    """Driver side, in input order: keep / quarantine / skip each checked row.
    Returns (refs to encode, quarantine rows, counts, conversions of kept rows). The counts
    include the kept rows' caption fixes: `captions_truncated`, `control_characters_removed`
    (rows that had some)."""
    checks = checks.sort_by("order")
    keep, quarantined, counts, converted = set(), [], Counter(), Counter()
    first: dict[str, str] = {}
    for row in checks.to_pylist():
        sid, ref = row["sample_id"], row["ref"]
        if reason := _text(row["reason"]):
            quarantined.append({"ref": ref, "sample_id": sid, "reason": reason, "detail": _text(row["detail"])})
            continue
        if sid in first:  # decided before "present", so reruns quarantine the same rows
            quarantined.append({"ref": ref, "sample_id": sid, "reason": "duplicate",
                                "detail": f"same image and caption as {first[sid]}"})
            continue
        first[sid] = ref
        if sid in present:
            counts["skipped_present"] += 1
            continue
        keep.add(ref)
        if _text(row["converted"]):
            converted[row["converted"]] += 1
        counts["captions_truncated"] += row.get("truncated") is True
        counts["control_characters_removed"] += (row.get("control_characters") or 0) > 0
    counts["new"] = len(keep)
    return keep, quarantined, counts, converted


def write_quarantine(uri: str, rows: list[dict], resources: ResourcesConfig) -> int:
    """Append quarantine rows not recorded by an earlier run; returns how many were new."""
    import pyarrow.parquet as pq

    known = set(store.read_column(f"{uri}/{store.QUARANTINE}", "quarantine_id", resources))
    now = datetime.now(UTC).isoformat(timespec="seconds")
    new = []
    for r in rows:
        qid = quarantine_id(r["ref"], r["sample_id"], r["reason"])
        if qid not in known:
            known.add(qid)
            new.append({"quarantine_id": qid, **r, "time": now})
    if new:
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(new, schema=QUARANTINE_SCHEMA), buf)
        name = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}.parquet"
        write_bytes(f"{uri}/{store.QUARANTINE}/{name}", buf.getvalue().to_pybytes(), resources)
    return len(new)
