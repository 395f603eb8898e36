# neuroscribe — set-up, demo, tests, benchmarks.
#   make demo    install (once) and run the main job on the offline embedded default
#   make test    install (once) and run the test suite
PY ?= python3
# torch is pinned to the release that lies on this project's build machines' disk (pip takes it from there);
# elsewhere it is a normal PyPI install. Override with `make TORCH="torch torchvision" ...`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= offline,timm,dev
JOB ?= jobs/demo
STAMP := .setup.stamp

.PHONY: setup demo test bench bench-quick clean

$(STAMP): pyproject.toml
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ".[$(EXTRAS)]"
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

clean:
	rm -rf $(STAMP) jobs .pytest_cache
