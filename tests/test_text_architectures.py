"""The text twin: exact for Qwen3, Qwen2, Llama, Mistral (sliding window) and Gemma 3; refuses what it cannot reproduce."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import all_errors, run_cli
from vl_masking.analysis import analyse
from vl_masking.api import prepare
from vl_masking.inputs import load_model
from vl_masking.options import RunSettings
from vl_masking.tiny_models import build_causal_lm

ARCHITECTURES = {
    "qwen3": {},
    "qwen2": {},
    "llama": {},
    "mistral": {"sliding_window": 4},  # shorter than the prompt: the window matters
    "gemma3_text": {"sliding_window": 4, "query_pre_attn_scalar": 24,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
}
UNSUPPORTED = {
    "gemma2": ({"attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 16}, "soft-capping"),
    "gpt_oss": ({"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4,
                 "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}, "attention sinks"),
}
PROMPT = "The capital of France is a city on the river"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-models")
    return {name: build_causal_lm(root / name, model_type=name, **extra)
            for name, extra in {**ARCHITECTURES, **{k: v[0] for k, v in UNSUPPORTED.items()}}.items()}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_variant_layer_position_and_step_equals_reference_and_generate(architecture, model_dirs, tmp_path):
    settings = RunSettings(model=str(model_dirs[architecture]), prompt=PROMPT, num_tokens=4, device="cpu",
                           dtype="float32", chat=False, vision_attention="causal", output_dir=str(tmp_path), tool="text",
                           check=1)  # keeps every layer's input, which the reference re-runs from
    loaded = load_model(settings)
    inputs, plan = prepare(loaded, settings)
    analysis = analyse(loaded, inputs, plan, settings, progress=False)
    assert len(analysis.measure.records) == 4 * 3 and all_errors(analysis) < 1e-5
    plain = AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch.float32).eval()
    expected = plain.generate(**inputs.model_kwargs, max_new_tokens=4, do_sample=False)
    assert analysis.metadata["generated_ids"] == expected[0, inputs.input_ids.shape[1]:].tolist()
    table = analysis.table
    assert set(table.token_type) == {"text"}
    assert (table[["image_index", "grid_row", "grid_col"]] == -1).all().all()


def test_sliding_window_layers_ignore_keys_outside_the_window(model_dirs, tmp_path):
    settings = RunSettings(model=str(model_dirs["mistral"]), prompt=PROMPT, num_tokens=1, device="cpu",
                           dtype="float32", chat=False, vision_attention="causal", variants=("Full",),
                           output_dir=str(tmp_path), tool="text")
    loaded = load_model(settings)
    table = analyse(loaded, *prepare(loaded, settings), settings, progress=False).table
    last = table.token_position.max()
    outside = table[table.token_position <= last - 4]
    inside = table[table.token_position > last - 4]
    assert len(outside) and (outside.l2_distance == 0).all()
    assert (inside.l2_distance > 0).all()


@pytest.mark.parametrize("architecture", sorted(UNSUPPORTED))
def test_unsupported_attention_feature_exits_2_naming_it_and_writes_nothing(architecture, model_dirs, tmp_path):
    proc = run_cli("mask_impact_analysis.py", "--model", model_dirs[architecture], "--prompt", PROMPT,
                   "--output-dir", tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and UNSUPPORTED[architecture][1] in lines[0]
    assert list(tmp_path.iterdir()) == []
    assert "Prompt:" not in proc.stdout  # refused before any work


def test_cli_writes_the_three_contract_files(model_dirs, tmp_path):
    from vl_masking.results import read_metadata, read_table
    from vl_masking.measures.layer import LAYER_COLUMNS as COLUMNS

    proc = run_cli("mask_impact_analysis.py", "--model", model_dirs["qwen3"], "--prompt", "The capital of France is",
                   "--num-tokens", 5, "--output-dir", tmp_path, check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "masking_results.csv", "masking_results.json", "masking_results.meta.json", "masking_results.parquet"]
    for ext in ("parquet", "csv", "json"):
        table = read_table(tmp_path / f"masking_results.{ext}")
        assert list(table.columns) == COLUMNS
        meta = read_metadata(tmp_path / f"masking_results.{ext}")
        assert meta["prompt_format"] == "raw" and meta["images"] == []
        assert len(table) == sum(meta["units_per_step"]) * meta["num_layers"] * (2 + meta["num_heads"])
    assert "Wrote:" in proc.stdout


def test_chat_flag_wraps_the_prompt_in_the_chat_template(model_dirs, tmp_path):
    from vl_masking.api import run_masking_experiment

    df = run_masking_experiment("Hi", model=str(model_dirs["qwen3"]), device="cpu", chat=True, num_tokens=1)
    tokens = df.attrs["metadata"]["final_tokens"]
    assert tokens[0] == "<|im_start|>" and "assistant" in tokens
    assert df.attrs["metadata"]["prompt_format"] == "chat template"


@pytest.mark.parametrize("chat", [False, True])
def test_the_text_group_holds_exactly_the_prompts_words_raw_and_in_the_chat_template(model_dirs, chat):
    """Raw text (with the tokenizer's BOS, if any) and the ChatML turn around a system and a user message: the
    flow group `text` is their words, not `system\\n`, `user\\n` or the special tokens."""
    from vl_masking.flow_groups import Group

    settings = RunSettings(model=str(model_dirs["llama"]), tool="text", prompt=PROMPT, chat=chat,
                           system="Answer briefly." if chat else None, device="cpu", dtype="float32")
    loaded = load_model(settings, weights=False)
    tokens = prepare(loaded, settings)[0].tokens
    words = "".join(tokens.text[p] for p in Group.parse("text").positions(tokens, 0))
    assert "".join(words.split()) == ("Answerbriefly." if chat else "") + "".join(PROMPT.split()), tokens.text
    assert any(tokens.is_special) == chat
