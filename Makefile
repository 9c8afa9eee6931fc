# Two commands on a machine with python3 and make:
#   make demo   set up .venv (core + [grain,onednn]: no TensorFlow) and run the example's --smoke job
#   make test   set up .venv (+ [torch,test,onednn] and the test-only references) and run pytest
# Set-up is idempotent: a stamp named after the hash of what it installed from skips it next time.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Quiet pip; PYTHONWARNINGS reaches the build backend too, so setuptools' editable-install
# notice box stays out (it says nothing a user of this checkout can act on).
PIP := PYTHONWARNINGS=ignore $(PY) -m pip install -q --disable-pip-version-check
TORCH := torch==2.13.0# pinned CPU build: an unpinned torch resolves to a multi-GB CUDA build
NODEPS := tests/requirements-nodeps.txt
HASH := $(shell cat pyproject.toml $(NODEPS) | $(PYTHON) -c "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:12])")
# Two workers, one test file each at a time (module fixtures built once): the 2-core machines
# this suite must finish on in 10 minutes are idle half the time in a serial run. A worker that
# crashes is reported at once and replaced once; a second crash ends the run cleanly (xdist would
# otherwise replay the crashing file up to 8 times). Native code runs in subprocesses where it can.
PYTEST_ARGS ?= -n 2 --dist loadfile --max-worker-restart=1

.PHONY: demo test setup-demo setup-test
demo: setup-demo
	$(PY) examples/finetune_catsdogs.py --smoke --pipeline grain

# pytest's exit status is also left in $(VENV)/.pytest-status for .ci/run.
test: setup-test
	$(PY) -m pytest $(PYTEST_ARGS); status=$$?; echo $$status > $(VENV)/.pytest-status; exit $$status

setup-demo: $(VENV)/.stamp-demo-$(HASH)
setup-test: $(VENV)/.stamp-test-$(HASH)

$(PY):
	@echo "Creating $(VENV) (a Python virtual environment in this checkout)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(VENV)/.stamp-demo-$(HASH): | $(PY)
	@echo "Installing vggjax with its grain and onednn extras into $(VENV): JAX, Flax, Optax, Orbax, Grain, oneDNN (about 1 GB, under a minute with pip's cache warm)"
	$(PIP) -e ".[grain,onednn]"
	rm -f $(VENV)/.stamp-demo-* && touch $@

$(VENV)/.stamp-test-$(HASH): | $(PY)
	@echo "Installing CPU torch 2.13, then vggjax with every extra and the test references into $(VENV): TensorFlow, Keras, torch, onnxruntime, ... (several GB, minutes)"
	$(PIP) $(TORCH)
	$(PIP) -e ".[train,grain,torch,test,onednn,export,hub]"
	$(PIP) --no-deps -r $(NODEPS)
	rm -f $(VENV)/.stamp-test-* && touch $@
