# The two commands a new user needs: `make run` and `make test`. Both install into .venv first.
PYTHON      ?= python3
VENV        ?= .venv
# CPU build on a laptop/CI box; on a GPU cluster: make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX=...
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
CONFIG      ?= pipelines/configs/toy.yaml
PY          := $(VENV)/bin/python
# idle OpenMP threads sleep instead of spinning (many torch processes share the cores here)
export OMP_WAIT_POLICY ?= PASSIVE
# C++ ops that DeepSpeed compiles on first use live with the venv that built them (the default
# ~/.cache is shared by every checkout and rebuilt whenever another one used it)
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
# the venv's tools first, as in an activated venv: its `ray`, and its `ninja`, whose build log
# another ninja version reads as changed (a full rebuild of those ops)
export PATH := $(abspath $(VENV))/bin:$(PATH)
STAMP       := $(VENV)/.installed

.PHONY: install browser run test test-fast lint dry-run docs image bench-sampler bench-teacher bench-precompute bench-distill bench-serve toy-teacher clean

install: $(STAMP)

$(STAMP): pyproject.toml cluster/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned, so nothing below pulls a multi-GB CUDA build on a CPU box.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -c cluster/constraints.txt -e ".[test]"
	# Without CUDA, DeepSpeed's collectives compile a C++ op on first use (about 30 s on 2 cores):
	# compile it here rather than inside the first training run.
	$(PY) -c "import torch; torch.cuda.is_available() or __import__('deepspeed.ops.op_builder.cpu', fromlist=['cpu']).ShareMemCommBuilder().load(verbose=False)"
	touch $(STAMP)

run: install
	$(PY) pipelines/distill.py --config $(CONFIG)

dry-run: install
	$(PY) pipelines/distill.py --config $(CONFIG) --dry-run

# Headless Chromium for the Serve playground test: Debian's package, installed here (as root, or
# through sudo) when it is not on PATH, so that no test installs system packages.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "make browser: install Chromium (headless) with your package manager"; exit 1; }; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }; }

# The whole suite, as CI runs it, on one local Ray cluster started once.
test: install browser lint
	$(PY) -m pytest -q --durations=20 tests

# The inner loop: every test that needs no Ray cluster and runs no training.
test-fast: install lint
	$(PY) -m pytest -q tests -m "not ray and not training"

# ruff, configured in pyproject.toml ([tool.ruff]: diffusers' line length, pyflakes, pycodestyle, isort)
lint: install
	$(PY) -m ruff check pipelines swd_core tests bench

# docs/configuration.md from the schema's field descriptions (tests/test_schema_docs.py checks it is current)
docs: install
	$(PY) -m pipelines.schema_docs docs/configuration.md

# The cluster image (cluster/Dockerfile) with docker or podman; push it and pass --image to render.
RAY_PIN     := $(shell sed -n 's/^ray==//p' cluster/constraints.txt)
IMAGE       ?= swd-ray:$(RAY_PIN)
ENGINE      ?= $(shell command -v docker || command -v podman)
image:
	@test -n "$(ENGINE)" || { echo "make image: needs docker or podman (or ENGINE=...)"; exit 1; }
	$(ENGINE) build -f cluster/Dockerfile --build-arg TORCH_SPEC="$(TORCH_SPEC)" -t $(IMAGE) .

bench-sampler: install
	$(PY) bench/sampler.py

bench-teacher: install
	$(PY) bench/teacher_quality.py

bench-precompute: install
	$(PY) bench/precompute.py

bench-distill: install
	$(PY) bench/distill.py

bench-serve: install
	$(PY) bench/serve.py

# Trains the evaluator, the toy VAE and the toy SD3 teacher at every latent side the toy schedules
# use (hours on 2 cores; a teacher trained at fewer sides on the same VAE is fine-tuned). Resumable: run it again
# to continue; finished phases are skipped. HOURS is the transformer's budget across runs (default:
# the one its checkpoint was trained under, else 2); DEVICE=cuda trains the VAE and the transformer on a GPU.
HOURS  ?=
DEVICE ?= cpu
toy-teacher: install
	$(PY) -m swd_core.toy.train all $(if $(HOURS),--hours $(HOURS)) --device $(DEVICE)

clean:
	rm -rf $(VENV) runs .pytest_cache
