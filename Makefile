# Two commands matter: `make tutorial` (the main job) and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch release this project is tested with. Elsewhere (a laptop, a GPU box) override it,
# e.g. `make test TORCH_SPEC="torch torchvision"`; on Colab use `pip install -e .` and keep its torch.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CLIPART_DIR ?= .cache/openclipart
# Extra flags for the tutorial runner, e.g. `make tutorial TUTORIAL_FLAGS="--time-limit 600 --strict-time"`.
TUTORIAL_FLAGS ?=

.PHONY: setup clipart test lint tutorial benchmarks study study-partial study-scratch study-quick clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Debian's openclipart-png, unpacked without root into $(CLIPART_DIR) (or found in /usr/share/openclipart).
clipart: setup
	$(PY) -m pdclip.data.clipart fetch --root $(CLIPART_DIR)

lint: setup
	$(PY) -m ruff check .

test: setup clipart lint
	$(PY) -m pytest -q

tutorial: setup clipart
	$(PY) -m tools.tutorial --out outputs $(TUTORIAL_FLAGS)

benchmarks: setup
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The reproduction study (docs/results.md), resumable (finished runs are skipped), two single-threaded
# runs at a time. study: the main one, pretrained frozen towers on cached features, each run's budget chosen
# on validation (330 runs; seeds 0-2 of all but the size sweep, 168 runs, took 93 min on 2 shared cores).
# study-scratch: towers from scratch (162 runs, ~2 h). study-quick: its 30-run slice (~25 min).
study: setup clipart
	$(PY) -m pdclip.study --preset frozen --out runs/study-frozen --jobs 2 --results docs/results.md

# study-partial: PSD where its teacher can disagree with the label: the towers' last blocks / layer train on
# cached trunks (60 runs; from an empty cache, extracting the trunks took 22 min, then 21-29 min per seed of
# the first 10 runs on 2 shared cores; the 40 runs docs/results.md reports took 114 min).
study-partial: setup clipart
	$(PY) -m pdclip.study --preset partial --out runs/study-partial --jobs 2 --results docs/results.md

study-scratch: setup clipart
	$(PY) -m pdclip.study --preset full --out runs/study --jobs 2 --results docs/results.md

study-quick: setup
	$(PY) -m pdclip.study --preset quick --out runs/study-quick --results docs/results.md

clean:
	rm -rf outputs runs .pytest_cache .ruff_cache
