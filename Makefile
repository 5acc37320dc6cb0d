# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, explain attention on a real model (writes out/)
#   make test   create .venv, install, lint, type-check, run the whole suite, check the package
#
# torch is installed in its own pip call *before* the project so that no dependency's
# torch range pulls a CUDA build. GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# two pytest workers (pytest-xdist): about half the wall time on 2 cores; PYTEST_ARGS= runs serially
PYTEST_ARGS ?= -n 2

.PHONY: demo test lint format package bench browser clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev,viz,models,triton]'
	touch $@

demo: $(STAMP)
	mkdir -p out
	HF_HUB_OFFLINE=1 $(BIN)/attnkit explain --steps --rollout --sparse sliding_window:2,2 \
		--png out/attention.png --html out/attention.html
	$(BIN)/attnkit patterns --length 64 --block 8 --html out/patterns.html > /dev/null
	@echo "open out/attention.html (head, model and neuron views) and out/patterns.html (the \
	sparse patterns' tiles) in a browser; out/attention.png is the layer's heatmaps, \
	out/attention.rollout.png the attention rollout after each layer"

# Headless Chromium for the HTML head-view test; where apt-get cannot install it, that one
# test is skipped with a message saying so.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
		>/dev/null 2>&1; then echo "installed chromium"; \
	else echo "chromium could not be installed: the browser test will be skipped"; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) package

# Build wheel + sdist, install the wheel into a fresh venv, import it and run one attention call.
package: $(STAMP)
	rm -rf dist /tmp/attnkit-pkg-venv /tmp/attnkit-pkg-ext
	$(BIN)/python -m build -q --outdir dist . > /dev/null
	$(PYTHON) -m venv /tmp/attnkit-pkg-venv
	/tmp/attnkit-pkg-venv/bin/python -m pip install -q $(TORCH_SPEC)
	/tmp/attnkit-pkg-venv/bin/python -m pip install -q dist/*.whl
	# the wheel alone must build the CPU kernels (sources, header, ninja) and run them
	cd /tmp && TORCH_EXTENSIONS_DIR=/tmp/attnkit-pkg-ext /tmp/attnkit-pkg-venv/bin/python -c \
	"import attnkit, torch; from attnkit.backends import cpu_kernel; \
	assert cpu_kernel.available(), 'CPU kernels did not build'; \
	q = torch.randn(1, 2, 5, 8, requires_grad=True); \
	out = attnkit.attention(q, q, q, mask=attnkit.masks.causal(), backend='tiled'); \
	out.sum().backward(); \
	from attnkit.viz import head_view_html, pattern_view_html; \
	assert 'Neuron view' in head_view_html(['a'], [torch.ones(1, 1, 1)]), 'pages not shipped'; \
	assert 'flash kernel' in pattern_view_html({'c': attnkit.masks.causal()}, 8); \
	print('package ok:', attnkit.__version__, tuple(q.grad.shape))"
	ls dist
	# the throwaway venv holds a second torch (~1 GB): left behind, repeated runs fill the disk
	rm -rf /tmp/attnkit-pkg-venv /tmp/attnkit-pkg-ext

bench: $(STAMP)
	$(BIN)/attnkit bench --json benchmarks/results/cpu.json --png docs/tiled-scaling.png

clean:
	rm -rf $(VENV) dist build out .pytest_cache .mypy_cache .ruff_cache
