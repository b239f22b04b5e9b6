# Set-up is two commands: `make demo` and `make test`; both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Pinned here for a reproducible venv; pyproject.toml declares ranges so users keep their own builds.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: demo test test-fast bench gpu-check fidelity config-docs docs clean

# Bytecode is compiled after the install on every core (pip compiles one file at a time: torch's
# ten thousand files take it half a minute); a file no Python can compile is skipped, as pip does.
$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile $(TORCH_PINS) -e '.[test]'
	$(BIN)/python -m compileall -q -j 0 $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') > /dev/null || true
	rm -f $(VENV)/.installed-*
	touch $@

# The main job: BP and Sideways on the embedded synthetic dataset, one table.
demo: $(STAMP)
	$(BIN)/sideways compare experiments/synthetic.yaml --out runs/demo

# The checkout's own bytecode first, on every core: the suite starts a few hundred processes, and
# where PYTHONDONTWRITEBYTECODE is set each would compile the package again (half a CPU second).
test: $(STAMP)
	$(BIN)/python -m compileall -q -j 0 sideways_cli tests benchmarks > /dev/null
	$(BIN)/python -m pytest -q

# The edit-test loop: every test that starts no process and takes seconds (CI runs make test).
test-fast: $(STAMP)
	$(BIN)/python -m compileall -q -j 0 sideways_cli tests benchmarks > /dev/null
	$(BIN)/python -m pytest -q -m "not slow and not multiprocess"

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/memory_vs_clip_length.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/depth_parallel.py
	$(BIN)/python benchmarks/data_parallel.py

# On a CUDA machine: training, eval, exact resume, AMP, GPU decoding, determinism, engine frames/s and memory,
# and with 2-4 GPUs stages and replicas, in under 8 minutes; without CUDA it says so and exits 0.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

# Static video with per-frame modules: Sideways == BP (cosine 1); shuffled frames: the bottom falls.
fidelity: $(STAMP)
	$(BIN)/sideways fidelity --set model.temporal_kernel=1 --video static
	$(BIN)/sideways fidelity --set model.temporal_kernel=1 --video shuffled
	$(BIN)/sideways fidelity --video natural

# docs/config.md from the config's declarations (a test fails when it is out of date)
config-docs: $(STAMP)
	$(BIN)/python -m sideways_cli.reports.config_reference docs/config.md

# The pages of docs/ as a site in site/ (mkdocs.yml); --strict fails on a dead link or a page left out
docs: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs build site *.egg-info
