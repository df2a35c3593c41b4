"""Flow analysis: the batched windowed knockout equals one full forward pass per configuration."""

import numpy as np
import pytest
import torch

from conftest import PIGGY, analyse_vl, run_cli, vl_settings
from vl_masking.flow import METRICS, flow_error, window_of
from vl_masking.inputs import load_model
from vl_masking.options import RunSettings
from vl_masking.tiny_models import build_causal_lm, build_qwen3_vl

TOLERANCE = 1e-5
PROMPT = "Is the piglet pink? Compare the two images."
GROUP_FLOWS = ("image->question", "image->last", "question->last")


def sharpen(loaded, factor=20.0):
    """Random weights predict an almost uniform next token; a larger LM head makes it peaked, so that
    blocking moves probabilities by percents and the comparison with the reference means something."""
    loaded.model.get_output_embeddings().weight.data.mul_(factor)
    return loaded


@pytest.fixture(scope="module")
def sharp_vl(tiny_vl_dir):
    return sharpen(load_model(RunSettings(model=str(tiny_vl_dir), prompt="-", device="cpu", dtype="float32")))


def flow_settings(model_dir, tmp_path, tall_image, **overrides):
    values = dict(images=[str(PIGGY), str(tall_image)], prompt=PROMPT, measure="flow", num_tokens=3,
                  mask_mode="both", window=3)
    values.update(overrides)
    return vl_settings(model_dir, tmp_path, **values)


def max_flow_error(analysis, per_window: int | None = None) -> float:
    """(step, flow, window, unit) configurations of the run against one full forward pass each (identical windows
    once): all of them, or per (step, flow, window) the first unit, the last and per_window - 2 others drawn with a
    fixed seed. A wrong adapter (positions, image features, masks) is wrong for whole windows and every kind of
    unit; the sample keeps every window, step and flow, the units at both ends, and costs a tenth of the forwards."""
    measure = analysis.measure.engine
    rng = np.random.default_rng(0)
    worst, seen = 0.0, {}
    for step, pair_index, units, metrics in measure.results:
        for centre in measure.centres:
            window = measure.windows[centre]
            chosen = range(len(units))
            if per_window is not None and len(units) > per_window:
                inner = rng.choice(np.arange(1, len(units) - 1), per_window - 2, replace=False)
                chosen = [0, *sorted(int(i) for i in inner), len(units) - 1]
            for unit_index in chosen:
                key = (step, pair_index, unit_index, window)
                if key in seen:
                    continue
                ours = {name: float(metrics[window][name][unit_index]) for name in METRICS}
                seen[key] = flow_error(ours, measure.reference(step, pair_index, unit_index, centre))
                worst = max(worst, seen[key])
    assert seen, "nothing was compared"
    return worst


# In both modes a sample of each window's units: every window, step and flow (test_word_and_region_units... checks
# every configuration of its units).
@pytest.mark.parametrize("vision_attention,window,per_window", [("bidirectional", 3, 12), ("causal", 1, 6)])
def test_token_units_and_groups_equal_the_reference_on_qwen3_vl(sharp_vl, tall_image, tmp_path, vision_attention,
                                                                window, per_window):
    # Targets inside the images re-run image rows, to which DeepStack adds visual features after
    # the first layers (and which see each other in the bidirectional prompt).
    image_targets = ("0-3->image", "image:0->image:1")
    settings = flow_settings(sharp_vl.name, tmp_path, tall_image, vision_attention=vision_attention, window=window,
                             flows=("units->last", *GROUP_FLOWS, *image_targets))
    analysis, _ = analyse_vl(sharp_vl, settings)
    assert analysis.metadata["steps"] == 3
    assert analysis.capture.additions is not None and len(analysis.capture.additions[1]) == 2  # DeepStack
    assert max_flow_error(analysis, per_window) < TOLERANCE
    table = analysis.table
    assert set(table.flow.astype(str)) == {"units->last", *GROUP_FLOWS, *image_targets}
    assert not table[["prob", "rel_change_pct", "delta_logprob", "kl"]].isna().any().any()
    assert table.rel_change_pct.abs().max() > 1  # blocking does change the prediction


@pytest.mark.parametrize("vision_attention", ["bidirectional", "causal"])
def test_word_and_region_units_with_a_window_wider_than_the_model(sharp_vl, tall_image, tmp_path, vision_attention):
    settings = flow_settings(sharp_vl.name, tmp_path, tall_image, vision_attention=vision_attention, window=9,
                             mask_unit="region:2x2")
    analysis, _ = analyse_vl(sharp_vl, settings)
    assert max_flow_error(analysis) < TOLERANCE
    table = analysis.table
    assert {"word", "region"} <= set(table.unit_kind.astype(str))
    assert (table.window_start == 0).all() and (table.window_end == 2).all()  # W = 9 > 3 layers: all of them


def test_rows_carry_the_unit_columns_the_target_and_consistent_metrics(sharp_vl, tall_image, tmp_path):
    settings = flow_settings(sharp_vl.name, tmp_path, tall_image, flows=("units->last", "image->question"),
                             num_tokens=2)
    analysis, _ = analyse_vl(sharp_vl, settings)
    table, meta = analysis.table, analysis.metadata
    assert meta["measure"] == "flow" and meta["flows"] == ["units->last", "image->question"]
    units = table[table.flow == "units->last"]
    per_step = units.groupby("generation_step").size().tolist()
    assert per_step == [3 * n for n in meta["units_per_step"]]  # 3 windows x units
    group = table[table.flow == "image->question"]
    assert (group.unit_kind == "group").all() and (group.unit_size == 15 + 8).all()
    assert (group.unit == "image").all()
    for step, target in enumerate(meta["generated_ids"]):
        rows = table[table.generation_step == step]
        assert (rows.target_token_id == target).all()
    p, p0 = table.prob.to_numpy(np.float64), table.base_prob.to_numpy(np.float64)
    assert np.allclose(table.rel_change_pct, (p - p0) / p0 * 100, rtol=1e-4, atol=1e-4)
    assert np.allclose(table.delta_logprob, np.log(p) - np.log(p0), atol=1e-4)
    assert (table.kl >= 0).all()
    assert ((table.new_top1_token.astype(str) != table.predicted_token.astype(str)) == table.top1_changed).all()


def test_an_empty_source_changes_nothing_and_blocking_every_key_is_a_number(sharp_vl, tall_image, tmp_path):
    from vl_masking.api import prepare

    length = prepare(sharp_vl, flow_settings(sharp_vl.name, tmp_path, tall_image))[0].prompt_length
    whole = f"0-{length - 1}"  # every key the last prompt position sees, itself included
    settings = flow_settings(sharp_vl.name, tmp_path, tall_image, flows=("generated->last", f"{whole}->last"),
                             num_tokens=2, window=1)
    analysis, _ = analyse_vl(sharp_vl, settings)
    table = analysis.table
    empty = table[(table.flow == "generated->last") & (table.generation_step == 0)]
    assert len(empty) == 3 and (empty.unit_size == 0).all()
    assert (empty.rel_change_pct == 0).all() and (empty.kl == 0).all() and (empty.prob == empty.base_prob).all()
    everything = table[(table.flow == f"{whole}->last") & (table.generation_step == 0)]
    assert len(everything) == 3
    assert np.isfinite(everything[["prob", "rel_change_pct", "kl"]].to_numpy()).all()
    assert max_flow_error(analysis) < TOLERANCE


def test_windows_follow_the_width_around_each_layer():
    assert [window_of(c, 9, 36) for c in (0, 4, 5, 30, 35)] == [
        window_of(0, 9, 36).__class__(*w) for w in ((0, 4), (0, 8), (1, 9), (26, 34), (31, 35))]
    assert window_of(2, 1, 4) == window_of(2, 1, 4).__class__(2, 2)
    assert window_of(5, 4, 36) == window_of(5, 4, 36).__class__(3, 6)  # even widths: W layers, one more below


TEXT_MODELS = {
    "llama": {},
    "mistral": {"sliding_window": 4},  # shorter than the prompt
}


@pytest.mark.parametrize("architecture", sorted(TEXT_MODELS))
def test_text_models_equal_the_reference(architecture, tmp_path):
    from vl_masking.analysis import analyse
    from vl_masking.api import prepare

    model = build_causal_lm(tmp_path / architecture, model_type=architecture, **TEXT_MODELS[architecture])
    settings = RunSettings(model=str(model), prompt="The capital of France is a city on the river", tool="text",
                           num_tokens=3, device="cpu", dtype="float32", chat=False, vision_attention="causal",
                           measure="flow", flows=("units->last", "question->last", "0-3->last"), window=3,
                           mask_unit="word", output_dir=str(tmp_path))
    loaded = sharpen(load_model(settings))
    inputs, plan = prepare(loaded, settings)
    analysis = analyse(loaded, inputs, plan, settings, progress=False)
    assert max_flow_error(analysis) < TOLERANCE
    if architecture == "mistral":  # keys beyond the window are invisible: blocking them changes nothing
        early = analysis.table[(analysis.table.flow == "0-3->last") & (analysis.table.generation_step == 2)]
        assert (early.rel_change_pct == 0).all()


def test_mixture_of_experts_equals_the_reference(tall_image, tmp_path):
    model_dir = build_qwen3_vl(tmp_path / "moe", layers=2, moe_experts=4)
    settings = flow_settings(model_dir, tmp_path, tall_image, num_tokens=2, window=1,
                             flows=("units->last", "image->question"))
    loaded = sharpen(load_model(settings))
    analysis, _ = analyse_vl(loaded, settings)
    assert max_flow_error(analysis, per_window=8) < TOLERANCE  # every window, step and flow; 8 units of each


def test_layers_on_disk_under_a_device_map_give_the_same_flow(tiny_vl_dir, tall_image, tmp_path):
    import json

    device_map = {"model.visual": "cpu", "model.language_model.embed_tokens": "cpu",
                  "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk",
                  "model.language_model.layers.2": "cpu", "model.language_model.norm": "cpu",
                  "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(device_map))
    tables = []
    for placement in ({"device": "cpu"}, {"device": "auto", "device_map": str(tmp_path / "map.json")}):
        settings = flow_settings(tiny_vl_dir, tmp_path, tall_image, num_tokens=2, flows=("units->last",
                                                                                         "image->question"),
                                 **placement)
        analysis, _ = analyse_vl(load_model(settings), settings)
        tables.append(analysis.table)
    assert len(tables[0]) == len(tables[1]) > 0
    for column in ("prob", "delta_logprob", "kl"):
        assert np.allclose(tables[0][column], tables[1][column], rtol=1e-5, atol=1e-7)


def test_a_bfloat16_model_reads_probabilities_from_float32_logits(tiny_vl_dir, tall_image, tmp_path):
    settings = flow_settings(tiny_vl_dir, tmp_path, tall_image, num_tokens=1, dtype="bfloat16", window=1,
                             flows=("image->question",))
    loaded = load_model(settings)
    analysis, _ = analyse_vl(loaded, settings)
    table = analysis.table
    assert np.isfinite(table[["prob", "base_prob", "kl"]].to_numpy()).all()
    head = loaded.model.get_output_embeddings().weight.detach()
    assert loaded.head_float32[0].dtype == torch.float32 and head.dtype == torch.bfloat16
    hidden = analysis.capture.final_hidden[0].float()
    expected = torch.softmax(hidden @ head.float().T, dim=-1)[analysis.metadata["generated_ids"][0]]
    assert table.base_prob.iloc[0] == pytest.approx(float(expected), rel=1e-5)


def test_a_float32_model_reads_the_unblocked_logits_from_generate_without_a_second_head_pass(
        tiny_vl_dir, tall_image, tmp_path):
    """The LM head is the costliest matrix of a small model: its float32 output during generate is the base."""
    from vl_masking.targets import step_logits

    settings = flow_settings(tiny_vl_dir, tmp_path, tall_image, num_tokens=2, window=1, flows=("image->question",))
    loaded = load_model(settings)
    analysis, _ = analyse_vl(loaded, settings)
    capture, head = analysis.capture, loaded.model.get_output_embeddings().weight.detach()
    assert len(capture.head_logits) == len(capture.final_hidden) == 2
    for step, target in enumerate(analysis.metadata["generated_ids"]):
        assert step_logits(loaded, capture, step) is capture.head_logits[step]  # no cap here: the tensor itself
        expected = torch.softmax(capture.final_hidden[step] @ head.T, dim=-1)[target]
        got = analysis.table[analysis.table.generation_step == step].base_prob.iloc[0]
        assert got == pytest.approx(float(expected), rel=1e-5)


def test_check_records_the_reference_error_in_the_metadata(sharp_vl, tall_image, tmp_path):
    settings = flow_settings(sharp_vl.name, tmp_path, tall_image, num_tokens=1, check=4)
    analysis, _ = analyse_vl(sharp_vl, settings)
    check = analysis.metadata["check"]
    assert len(check["checked"]) == 4 and check["max_error"] < TOLERANCE


BAD_FLOWS = {
    "unknown group": ["--measure", "flow", "--flow", "pixels->last"],
    "window 0": ["--measure", "flow", "--window", "0"],
    "source after target": ["--measure", "flow", "--flow", "last->question"],
    "flow without measure flow": ["--flow", "image->last"],
    "image group without image": ["--measure", "flow", "--flow", "image->last", "--no-image"],
    "units as a target": ["--measure", "flow", "--flow", "question->units"],
    "missing arrow": ["--measure", "flow", "--flow", "image"],
}


@pytest.mark.parametrize("case", sorted(BAD_FLOWS))
def test_bad_flow_options_exit_2_with_one_line_and_no_file(case, tiny_vl_dir, tmp_path):
    args = list(BAD_FLOWS[case])
    image = ["--image", PIGGY]
    if "--no-image" in args:
        args.remove("--no-image")
        image = []
    out = tmp_path / "out"
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, *image, "--prompt", "Describe this image.", *args,
                   "--output-dir", out)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not out.exists()


def test_cli_writes_a_flow_file_with_its_metadata(tiny_vl_dir, tmp_path):
    from vl_masking.measures.flow import FLOW_COLUMNS
    from vl_masking.results import read_metadata, read_table

    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--image", PIGGY, "--prompt", "Describe this image.",
                   "--measure", "flow", "--flow", "units->last", "--flow", "image->question", "--window", "3",
                   "--mask-mode", "both", "--mask-unit", "region:2x2", "--output-dir", tmp_path, "--output", "flow",
                   "--check", 2, check=True)
    assert "Check: 2 random results" in proc.stdout
    for ext in ("parquet", "csv", "json"):
        table = read_table(tmp_path / f"flow.{ext}")
        assert list(table.columns) == FLOW_COLUMNS
        meta = read_metadata(tmp_path / f"flow.{ext}")
        assert meta["measure"] == "flow" and meta["window"] == 3
        assert str(table.top1_changed.dtype) == "bool"
    assert torch.isfinite(torch.tensor(table.prob.to_numpy())).all()


def test_flow_pairs_name_groups_spans_and_text():
    from vl_masking.flow_groups import FlowPair

    pair = FlowPair.parse('text:"The Eiffel Tower"->last')
    assert (pair.source.name, pair.source.span.text, pair.target.name) == ("span", "The Eiffel Tower", "last")
    pair = FlowPair.parse("image:1->question")
    assert (pair.source.name, pair.source.image, pair.target.name) == ("image", 1, "question")
    assert FlowPair.parse("12-19->last").source.span.start == 12


def test_a_named_target_is_read_instead_of_the_prediction_and_rows_say_whether_the_model_got_it(tiny_text_dir,
                                                                                                 tmp_path):
    """--target text:" the": the first token of the text is the probability read at every step; each row
    and the metadata record the target, the greedy prediction and whether they agree; the reference agrees."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vl_masking.results import read_metadata, read_table

    prompt = "The quick brown fox jumps over"
    common = ["--model", tiny_text_dir, "--prompt", prompt, "--measure", "flow", "--window", 1, "--num-tokens", 2,
              "--output-dir", tmp_path, "--formats", "parquet"]
    run_cli("mask_impact_analysis.py", *common, "--output", "predicted", check=True)
    proc = run_cli("mask_impact_analysis.py", *common, "--target", 'text:" the"', "--output", "named", "--check", 6,
                   check=True)
    assert "target text:\" the\"" in proc.stdout
    named, meta = read_table(tmp_path / "named.parquet"), read_metadata(tmp_path / "named.parquet")
    predicted = read_table(tmp_path / "predicted.parquet")
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_dir)
    the = tokenizer.encode(" the", add_special_tokens=False)[0]
    assert (named.target_token_id == the).all() and (named.target_token.astype(str) == " the").all()
    assert meta["check"]["max_error"] < 1e-5 and meta["target"] == 'text:" the"'
    # the base probability of the named token, from a plain forward pass of the model
    model = AutoModelForCausalLM.from_pretrained(tiny_text_dir, dtype=torch.float32).eval()
    for entry in meta["targets"]:
        ids = torch.tensor([meta["final_ids"][: meta["prompt_length"] + entry["step"]]])
        with torch.no_grad():
            p = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)[the].item()
        assert entry["base_prob"] == pytest.approx(p, rel=1e-5) and entry["target_token"] == " the"
        rows = named[named.generation_step == entry["step"]]
        assert (rows.base_prob.to_numpy() == np.float32(entry["base_prob"])).all()
        greedy = tokenizer.decode([meta["generated_ids"][entry["step"]]])
        assert (rows.predicted_token.astype(str) == greedy).all()
        assert (rows.correct == (greedy == " the")).all() and entry["correct"] == (greedy == " the")
    # the default target is the prediction itself: every row correct, and the same generation
    assert predicted.correct.all() and (predicted.predicted_token.astype(str) == predicted.target_token.astype(str)).all()
    assert read_metadata(tmp_path / "predicted.parquet")["generated_ids"] == meta["generated_ids"]


@pytest.mark.parametrize("target", ["answer", 'text:""', "Paris"])
def test_a_target_that_is_neither_predicted_nor_a_text_is_refused(tiny_text_dir, tmp_path, target):
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--prompt", "Hi", "--measure", "flow",
                   "--target", target, "--output-dir", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: "), proc.stderr
    assert "--target" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
