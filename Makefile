# The README's quick start. `make demo`: set up and run the main job on the bundled sample.
# `make test`: set up and run the tests (what .ci/run runs).
VENV ?= .venv
# test processes (pytest-xdist; a test file stays in one process, so its fixtures are built once):
# two keep this 2-core machine busy while one waits on a subprocess, a socket or a kill
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
# an editable install: the folders converters/ and loaders/ import as arraystore.converters and
# arraystore.loaders only through the install's finder, also when run from the working tree
# (setuptools warns once, at set-up, that folders there may take precedence)
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export SAM2_BUILD_CUDA := 0

.PHONY: setup setup-test demo test bench bench-peers clean

# The set-up also installs the torchvision hook (arraystore/compat.py): beside the CPU
# torch it declares torchvision's missing operators at its first import.
$(VENV)/.setup: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[viz]"
	$(PY) -m arraystore.compat --install-hook
	touch $@

# the sam2 extra builds from source: PIP_CONSTRAINT (exported above) keeps its isolated build on
# the pinned CPU torch instead of pulling a CUDA torch; SAM2_BUILD_CUDA=0 skips its CUDA kernels
$(VENV)/.setup-test: $(VENV)/.setup
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,sam2,siglip,scale]"
	touch $@

setup: $(VENV)/.setup

setup-test: $(VENV)/.setup-test

demo: setup
	rm -rf demo && mkdir -p demo
	$(VENV)/bin/arraystore ingest sa1b samples/sa1b_sample.tar --out demo/sa1b.zarr
	$(VENV)/bin/arraystore info demo/sa1b.zarr
	$(PY) scripts/read_batch.py demo/sa1b.zarr
	$(VENV)/bin/arraystore show demo/sa1b.zarr

test: setup-test
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: setup-test
	$(PY) -m benchmarks.run

# the peers (MDS, LitData, Lance) in a venv of their own: mosaicml-streaming pins numpy<2.2;
# read from local files, then streamed cold from the simulated cloud region (s3fs: 'scale')
BENCH_VENV := .venv-bench
bench-peers:
	python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q -c constraints.txt -e ".[bench,scale]"
	$(BENCH_VENV)/bin/python -m benchmarks.peers
	$(BENCH_VENV)/bin/python -m benchmarks.remote_peers

clean:
	rm -rf demo .pytest_cache
