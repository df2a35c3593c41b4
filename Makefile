# make demo: install what is missing, run the whole pipeline offline on the bundled image.
# make test: install what is missing, run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel; on a CUDA machine install your own torch first (see README).
TORCH_VERSION ?= 2.13.0
DEMO_MODEL := .cache/tiny-qwen3-vl

.PHONY: install browser demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(DEMO_MODEL)/config.json: | install
	$(PY) -m vl_masking.tiny_models $(DEMO_MODEL)

demo: install $(DEMO_MODEL)/config.json
	$(PY) mask_impact_vl.py --model $(DEMO_MODEL) --image examples/piggy.png \
		--prompt-file examples/prompt.txt --mask-mode both --num-tokens 3 --output demo --check 8
	@echo
	@echo "Outputs: output/demo.parquet, output/demo.csv (+ output/demo.meta.json), output/demo.json"
	@echo "Viewers: open visualize_results.html or visualize_vl_grid.html in a browser and load output/demo.parquet"
	@echo "         (for the grid viewer, also load examples/piggy.png to see the picture under the grid)"

# The viewer tests drive Debian's chromium (a browser download is not possible here).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }

test: install browser
	$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .cache
