"""Nothing the project ships or loads unpickles: no pickle-format file in the repository, every
`torch.load` in its code passes `weights_only=True`, and the libraries' loaders it calls on files
from storage (DeepSpeed's `load_checkpoint`, on a resume and a warm start) refuse a planted
pickle payload without running it (a pickle from shared storage is code execution for whoever
can write there)."""

import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PICKLE_PROTOCOLS = tuple(bytes([0x80, p]) for p in range(2, 6))


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def is_pickle(path: Path) -> bool:
    head = path.read_bytes()[:2]
    if head in PICKLE_PROTOCOLS:
        return True
    if zipfile.is_zipfile(path):  # torch.save's format: a zip holding data.pkl
        with zipfile.ZipFile(path) as z:
            return any(name.endswith(".pkl") for name in z.namelist())
    return False


def test_no_pickle_file_in_the_repository():
    files = tracked_files()
    assert any(f.suffix == ".safetensors" for f in files)  # the scan sees the weights
    assert [str(f.relative_to(ROOT)) for f in files if is_pickle(f)] == []


def test_every_torch_load_is_weights_only():
    calls = []
    for f in tracked_files():
        if f.suffix == ".py" and f.name != Path(__file__).name:
            for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", f.read_text()):
                calls.append((f.relative_to(ROOT), m.group(0)))
    assert calls
    unsafe = [(str(f), c) for f, c in calls if "weights_only=True" not in c]
    assert unsafe == []


def project_sources() -> list[tuple[Path, str]]:
    return [(f.relative_to(ROOT), f.read_text()) for f in tracked_files()
            if f.suffix == ".py" and not str(f.relative_to(ROOT)).startswith("tests/")]


def test_every_deepspeed_load_checkpoint_goes_through_the_weights_only_reads():
    """DeepSpeed's `load_checkpoint` unpickles (`weights_only=False`) unless its checkpoint engine
    is swapped: the project calls it in one place only, the function that swaps it."""
    calls = [str(f) for f, text in project_sources() for _ in re.finditer(r"\.load_checkpoint\(", text)]
    assert calls == ["pipelines/stages/distill/checkpoint.py"], calls
    text = (ROOT / "pipelines/stages/distill/checkpoint.py").read_text()
    body = text[text.index("def load_engine_checkpoint("):]
    assert body.index("_WeightsOnlyReads(") < body.index(".load_checkpoint(")


def test_no_other_unpickling_loader_in_the_project():
    pattern = re.compile(r"\b(pickle|cloudpickle|dill|joblib)\.loads?\(|read_pickle\(|allow_pickle\s*=\s*True")
    assert [(str(f), m.group(0)) for f, text in project_sources() for m in pattern.finditer(text)] == []


class Payload:
    """Unpickled, it runs a shell command: here one that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """The file's own contents plus a payload, saved back with torch.save as a tamperer would."""
    import torch

    from pipelines.stages.distill.checkpoint import load_weights_only

    state = load_weights_only(path)
    torch.save({**state, "extra": Payload(marker)} if isinstance(state, dict) else [state, Payload(marker)], path)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_payload_planted_in_any_checkpoint_file_is_refused_on_resume_and_warm_start(tmp_path, monkeypatch,
                                                                                        deepspeed_world, zero_stage):
    """A real checkpoint (DeepSpeed engines in one process, written as the distill stage writes
    them); each of its `.pt` files in turn gets a payload. A resume (Ray Train's checkpoint) and a
    warm start (another run's, as retraining passes the champion's) are both refused, naming the
    file; the payload never runs. DeepSpeed's reads are refused on their own too (without the
    scan that runs first)."""
    import ray.train

    from pipelines.stages.distill.checkpoint import UnsafeCheckpointError, load_engine_checkpoint, restore_checkpoint
    from pipelines.stages.distill.engines import build_engines, student_ema
    from tests.deepspeed_world import config, tiny_nets, trained_checkpoint

    cfg = config(tmp_path, zero_stage=zero_stage, mode="full", steps=8, ema_decay=0.9 if zero_stage < 3 else 0.0)
    good = tmp_path / "good"
    trained_checkpoint(cfg, good, steps=1)
    files = sorted(p.relative_to(good) for p in good.rglob("*.pt"))
    assert len(files) == (5 if zero_stage < 3 else 4), files  # 2 model states, 2 optimizer states (+ the EMA)
    nets = tiny_nets(seed=1)
    student_engine, fake_engine = build_engines(cfg, nets, 4, bf16=False)
    ema = student_ema(cfg, nets)
    marker = tmp_path / "payload-ran"

    def refused(load, match: str, what: str) -> None:
        try:
            load()
        except UnsafeCheckpointError as err:
            assert re.search(match, str(err)), str(err)
        else:
            ran = "ran" if marker.exists() else "did not run"
            pytest.fail(f"{what} loaded {name} with its payload; the payload {ran}")
        assert not marker.exists(), f"{what}: the payload in {name} ran"

    for i, name in enumerate(files):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(good, bad)
        plant(bad / name, marker)
        where = f"refusing to load the checkpoint file {re.escape(str(bad / name))}: "
        monkeypatch.setattr(ray.train, "get_checkpoint", lambda bad=bad: ray.train.Checkpoint.from_directory(str(bad)))
        refused(lambda: restore_checkpoint(cfg, 0, student_engine, fake_engine, ema, "cpu", "plan"),
                where + r".*posix\.system", "a resume")
        monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
        refused(lambda bad=bad: restore_checkpoint(cfg, 0, student_engine, fake_engine, ema, "cpu", "plan",
                                                   warm_start=str(bad)),
                where, "a warm start")
        if name.parts[0] in ("student", "fake"):
            engine = student_engine if name.parts[0] == "student" else fake_engine
            refused(lambda bad=bad, engine=engine: load_engine_checkpoint(engine, str(bad / name.parts[0])),
                    where + "it is not weights only", "DeepSpeed's load_checkpoint")
    # the untouched checkpoint loads through the same reads, as a warm start and as a resume
    assert restore_checkpoint(cfg, 0, student_engine, fake_engine, ema, "cpu", "plan", warm_start=str(good))[0] == 1
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(good)))
    assert restore_checkpoint(cfg, 0, student_engine, fake_engine, ema, "cpu", "plan")[0] == 1
