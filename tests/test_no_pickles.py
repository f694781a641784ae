"""Nothing the project ships or loads unpickles: no pickle-format file in the repository, and
every `torch.load` in its code passes `weights_only=True` (a pickle from shared storage is code
execution for whoever can write there)."""

import re
import subprocess
import zipfile
from pathlib import Path

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
