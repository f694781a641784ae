"""`report.md` of the evaluate stage: the report.json content for a human reader."""

from __future__ import annotations

from swd_core.evaluation import ATTRIBUTES


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _interval(e: dict | None, n: int | None = None, digits: int = 3, signed: bool = False) -> str:
    """value [lo, hi], and the prompts it was computed on where they are fewer than the row's `n`."""
    if e is None:
        return "–"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(e['value'])} [{f.format(e['lo'])}, {f.format(e['hi'])}]" + (
        f" (n={e['n']})" if n is not None and e["n"] < n else "")


IMAGE_COLUMNS = [("clip_score", "CLIP score"), ("pickscore", "PickScore"), ("fd_dinov2", "FD DINOv2 to the teacher"),
                 ("fd_dinov2_source", "FD DINOv2 to the source")]


def _most(difference: dict) -> int:
    return max([e["n"] for e in difference["difference"].values()] or [0])


def image_metrics_section(report: dict) -> list[str]:
    """The image metrics of every model with their intervals, and the paired differences."""
    info, models = report["image_metrics"], report["models"]
    level = f"{info['level']:.0%}"
    cols = [(k, label) for k, label in IMAGE_COLUMNS if any(k in (x.get("image_metrics") or {}) for x in models)]
    out = ["## Image metrics", "",
           f"Value on all of a model's prompts and its {level} bootstrap interval over prompts ({info['resamples']} "
           f"resamples). Higher is better for CLIP score and PickScore, lower for the Fréchet distances. FD DINOv2 "
           f"to the teacher compares with {info['reference']}'s images of the same prompts and seeds (it is the "
           "reference: –)"
           + (f"; to the source, with {info['source_images']}." if info.get("source_images") else "."), ""]
    out += _table(["model", "prompts", *(label for _, label in cols)],
                  [[x["name"], str(x["n_prompts"]),
                    *(_interval(x["image_metrics"].get(k), x["n_prompts"]) for k, _ in cols)]
                   for x in models])
    if info["differences"]:
        diff_cols = [(k, label) for k, label in cols if any(k in d["difference"] for d in info["differences"])]
        win = any("pickscore_win_rate" in d for d in info["differences"])
        out += ["", f"### Paired differences ({level} intervals)", "",
                "The same prompts resampled for both models. An interval that excludes 0 is a difference these "
                "prompts resolve; one that straddles 0 is not. Win rate: the fraction of prompts on which the first "
                "model's PickScore is higher (0.5: no preference).", ""]
        out += _table(["model − baseline", "prompts", *(f"Δ {label}" for _, label in diff_cols)]
                      + (["PickScore win rate"] if win else []),
                      [[f"{d['model']} − {d['baseline']}", str(_most(d)),
                        *(_interval(d["difference"].get(k), _most(d), signed=True) for k, _ in diff_cols)]
                       + ([_interval(d.get("pickscore_win_rate"), _most(d))] if win else [])
                       for d in info["differences"]])
    return out + [""]


def render_markdown(report: dict) -> str:
    models, shapes_domain = report["models"], report["domain"] == "shapes"
    student = report["student"]
    m = report["machine"]
    out = [f"# Evaluation: {report['name']}", "",
           f"Teacher `{report['teacher']}`; student "
           + (f"`{student['uri']}`" if student["found"] else f"**not found** at `{student['uri']}`")
           + f"; prompts: {report['prompts']['source']}; seeds: {report['prompts']['seeds']}.", ""]
    chosen = student.get("chosen")
    if chosen:
        out += [f"The student is step {chosen['step']}, chosen by {chosen['metric']} {chosen['value']:.3f} among the "
                f"checkpoints at steps {', '.join(map(str, chosen['candidates']))} on validation prompts that are "
                f"not among these.", ""]
    out += [f"- {n}" for n in report["notes"]] + ([""] if report["notes"] else [])
    if student.get("curves"):
        out += ["## Training", "",
                "The distill run's losses, gradient norms and validation metric over steps "
                "(dotted: checkpoints; red: the exported step).", "", f"![training curves]({student['curves']})", ""]

    if report["checks"]:
        out += ["## Checks", ""]
        out += [f"- **{'PASS' if c['passed'] else 'FAIL'}** {c['check']} ({c['detail']})" for c in report["checks"]]
        out += ["", ("The first two are what `make run` must show; the rest are the paper-table targets, "
                     "reported for orientation."), ""] if shapes_domain else [""]

    out += ["## Metrics", ""]
    if shapes_domain:
        header = ["model", "steps", "cfg", "prompts", "prompt acc.", "one-object", "two-object", "FD (n)",
                  f"FD at n={models[0]['fd_common_n']}", "latency / image"]
        rows = [[x["name"], str(x["steps"]), f"{x['guidance']:g}", str(x["n_prompts"]), _f(x["prompt_accuracy"]),
                 _f(x["acc_one_object"]), _f(x["acc_two_object"]), f"{_f(x['fd'])} ({x['fd_n']})",
                 _f(x["fd_common"]), f"{x['latency']['total_s']:.3f} s"] for x in models]
        out += _table(header, rows)
        floor = ", ".join(f"{_f(v)} at n={n}" for n, v in report["fd_floor"].items())
        explain = (f"Prompt accuracy: the fraction of images whose every prompted attribute the classifier reads "
                   f"right (it reads {_f(report['classifier_real_accuracy'])} of real renders of these prompts "
                   "right). "
                   f"FD: Fréchet distance of classifier features to real renders of the same prompts; it grows as the "
                   f"number of images n shrinks, so compare models at the same n only. A second set of real renders "
                   f"scores {floor} (the floor).")
        out += ["", explain, "", "### Per attribute", ""]
        out += _table(["attribute", *(x["name"] for x in models)],
                      [[a, *(_f(x["per_attribute"][a]) for x in models)] for a in ATTRIBUTES])
    else:
        out += _table(["model", "steps", "cfg", "prompts", "latency / image"],
                      [[x["name"], str(x["steps"]), f"{x['guidance']:g}", str(x["n_prompts"]),
                        f"{x['latency']['total_s']:.3f} s"] for x in models])

    if report.get("image_metrics"):
        out += [""] + image_metrics_section(report)[:-1]

    lat_rows = [[x["name"], *(f"{x['latency'][k]:.4f}" for k in ("text_s", "transformer_s", "vae_s", "other_s",
                                                                 "total_s")),
                 str(x["latency"]["transformer_calls"]), f"{x['seconds_per_image_batched']:.4f}"] for x in models]
    where = (f"One prompt per call, median of {models[0]['latency']['repeats']} timed calls after a warm-up, on "
             f"{report['device']} ({m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"
             + (f", GPU {m['gpu']}" if m["gpu"] else "") + f"; 1-minute load average {_f(m['load_average_1m'], 1)} "
             "when the report was written). `other`: noise draws, upsampling and sampler math. `batched`: wall time "
             "of the evaluation batches divided by their images.")
    out += ["", "## Latency split (seconds per image)", "", where, ""]
    out += _table(["model", "text", "transformer", "VAE decode", "other", "total", "transformer calls", "batched"],
                  lat_rows)
    out += ["", "## Samples", "", "Rows: prompts; columns: models, same prompt and seed in each row.", "",
            "![comparison grid](grid.png)", "",
            f"Written in {report['seconds']:.0f} s. Raw numbers: `report.json`.", ""]
    return "\n".join(out)
