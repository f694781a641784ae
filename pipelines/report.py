"""`report.md` of the evaluate stage: the report.json content for a human reader."""

from __future__ import annotations

from swd_core.evaluation import ATTRIBUTES


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


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
                   f"right (it reads {_f(report['classifier_real_accuracy'])} of real renders of these prompts right). "
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
