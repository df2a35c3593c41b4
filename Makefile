# make demo: install what is missing, run the whole pipeline offline on the bundled image.
# make test: install what is missing, run the test suite (make test-fast: without browser and sharding tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Installed only when the environment has no torch; see the README for CUDA machines.
TORCH_VERSION ?= 2.13.0
DEMO_MODEL := .cache/tiny-qwen3-vl
# Test workers (pytest-xdist); each holds its own tiny models, so keep it near the number of cores.
WORKERS ?= 2

.PHONY: install browser demo test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(DEMO_MODEL)/config.json: vl_masking/tiny_models.py | install
	rm -rf $(DEMO_MODEL)
	$(PY) -m vl_masking.tiny_models $(DEMO_MODEL)

demo: install $(DEMO_MODEL)/config.json
	$(PY) mask_impact_vl.py --model $(DEMO_MODEL) --image examples/piggy.png \
		--prompt-file examples/prompt.txt --mask-mode both --num-tokens 3 --output demo --check 8
	$(PY) mask_impact_vl.py --model $(DEMO_MODEL) --image examples/piggy.png \
		--prompt-file examples/prompt.txt --mask-mode both --mask-unit region:2x2 --num-tokens 3 \
		--output demo_regions --check 8
	$(PY) mask_impact_vl.py --model $(DEMO_MODEL) --image examples/piggy.png \
		--prompt-file examples/prompt.txt --mask-mode both --measure flow --flow 'units->last' \
		--flow 'image->question' --flow 'question->last' --window 3 --num-tokens 3 --output demo_flow --check 4
	$(PY) -m vl_masking.figures output/demo.parquet output/demo_flow.parquet --image examples/piggy.png --out output/figures
	@echo
	@echo "Outputs (each as .parquet, .csv + .meta.json, .json):"
	@echo "  output/demo.*          token units, layer measure"
	@echo "  output/demo_regions.*  2x2 image regions and words"
	@echo "  output/demo_flow.*     flow analysis (units->last, image->question, question->last)"
	@echo "Figures: output/figures/"
	@echo "Viewers: open visualize_results.html or visualize_vl_grid.html in a browser and load one of the files"
	@echo "         (for the grid viewer, also load examples/piggy.png to see the picture under the grid)"

# The viewer tests drive Debian's chromium (a browser download is not possible here).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }

test: install browser
	$(PY) -m pytest -q -n $(WORKERS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: install
	$(PY) -m pytest -q -n $(WORKERS) -m "not browser and not sharding"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .cache
