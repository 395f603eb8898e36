# neuroscribe — set-up, demo, tests, benchmarks.
#   make demo      make .venv from the lock (once), then run the main job on the offline embedded default
#   make test      make .venv from the lock (once), then run the test suite (what CI runs)
#   make lock      re-resolve requirements/lock.txt to the newest versions pyproject.toml allows (pip-tools)
#   make mutation  mutation testing of the numeric core (slow; not run by CI)
#
# Every target works in its own virtual environment, .venv, made from requirements/lock.txt: every transitive
# version pinned by pip-compile (pip-tools) for CPython 3.11 on Linux x86_64. torch/torchvision are pinned to the
# releases in requirements/torch.txt: on this project's build machines pip takes them from local disk, elsewhere
# they are normal PyPI installs. To install unlocked as a library instead: pip install "neuroscribe[offline]".
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JOB ?= jobs/demo
STAMP := $(VENV)/.neuroscribe-setup
PIP_TOOLS ?= pip-tools==7.6.2
EXTRAS ?= offline,timm,dev
# Threads: one per core (a 2-core CI box is slowed badly by oversubscription).
export OMP_NUM_THREADS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: setup demo test bench bench-quick lock mutation clean

$(STAMP): requirements/lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/lock.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m neuroscribe demo --out $(JOB)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/record_overhead.py

bench-quick: $(STAMP)
	$(PY) benchmarks/record_overhead.py --quick

mutation: $(STAMP)
	$(PY) benchmarks/mutation.py

# Refresh the lock: newest versions allowed by pyproject.toml and requirements/torch.txt.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $(PIP_TOOLS)
	rm -f requirements/lock.new.txt
	CUSTOM_COMPILE_COMMAND="make lock" .venv-lock/bin/pip-compile -q --strip-extras --extra $(EXTRAS) \
	  -c requirements/torch.txt --allow-unsafe \
	  --no-emit-index-url --no-emit-find-links -o requirements/lock.new.txt pyproject.toml
	mv requirements/lock.new.txt requirements/lock.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-lock jobs .pytest_cache mutants build/mutation
