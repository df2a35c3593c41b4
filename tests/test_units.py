"""Mask units: words, images, regions and spans hidden at once, exactly as the reference hides them."""

import numpy as np
import pytest

from conftest import PIGGY, ROOT, all_errors, analyse_vl, run_cli, vl_settings
from vl_masking.api import prepare
from vl_masking.errors import UsageError
from vl_masking.tiny_models import TOKENIZER_DIR

TOLERANCE = 1e-5
PROMPT = "Is the piglet photosynthesis unbelievably pink? Compare the two images."


def two_images(tall_image, **overrides):
    return dict(images=[str(PIGGY), str(tall_image)], prompt=PROMPT, **overrides)


def plan_for(tiny_vl, tmp_path, **overrides):
    return prepare(tiny_vl, vl_settings(tiny_vl.name, tmp_path, **overrides))[1]


def test_words_join_the_pieces_the_tokenizer_split_and_special_tokens_stay_alone(tiny_vl, tmp_path):
    plan = plan_for(tiny_vl, tmp_path, images=[], prompt=PROMPT, mask_unit="word", mask_mode="text")
    labels = [u.label for u in plan.prompt_units]
    assert " photosynthesis" in labels and " unbelievably" in labels and " piglet" in labels
    assert " pink?" in labels and " images." in labels  # punctuation joins the word before it
    assert labels[:3] == ["<|im_start|>", "user", "\n"]
    assert "<|im_end|>" in labels and "assistant" in labels
    word = next(u for u in plan.prompt_units if u.label == " photosynthesis")
    assert word.kind == "word" and word.size == 2 and word.positions[1] == word.positions[0] + 1
    assert all(u.token_type == "text" and u.grid_rows == -1 for u in plan.prompt_units)


def test_regions_are_row_major_blocks_of_the_merged_grid_with_smaller_edge_blocks(tiny_vl, tall_image, tmp_path):
    plan = plan_for(tiny_vl, tmp_path, **two_images(tall_image, mask_unit="region:2x2", mask_mode="vision"))
    regions = [u for u in plan.prompt_units if u.kind == "region"]
    piggy = [u for u in regions if u.image_index == 0]  # 3 x 5 tokens
    assert [(u.grid_row, u.grid_col, u.grid_rows, u.grid_cols) for u in piggy] == [
        (0, 0, 2, 2), (0, 2, 2, 2), (0, 4, 2, 1), (2, 0, 1, 2), (2, 2, 1, 2), (2, 4, 1, 1)]
    start = plan.tokens.images[0].start
    assert piggy[0].positions == (start, start + 1, start + 5, start + 6)
    assert piggy[0].label == "image 0 rows 0-1 cols 0-1" and piggy[5].label == "image 0 row 2 col 4"
    tall = [u for u in regions if u.image_index == 1]  # 4 x 2 tokens
    assert [(u.grid_row, u.grid_col, u.size) for u in tall] == [(0, 0, 4), (2, 0, 4)]
    assert sum(u.size for u in regions) == 15 + 8
    assert not any(u.token_type == "text" for u in plan.prompt_units)  # mask-mode vision


def test_image_units_cover_each_image_and_text_defaults_to_words(tiny_vl, tall_image, tmp_path):
    plan = plan_for(tiny_vl, tmp_path, **two_images(tall_image, mask_unit="image", mask_mode="both"))
    images = [u for u in plan.prompt_units if u.kind == "image"]
    assert [(u.label, u.size, u.grid_rows, u.grid_cols) for u in images] == [("image 0", 15, 3, 5),
                                                                            ("image 1", 8, 4, 2)]
    assert plan.text_unit == "word" and any(u.kind == "word" for u in plan.prompt_units)
    tokens = plan_for(tiny_vl, tmp_path, **two_images(tall_image, mask_unit="image", text_unit="token",
                                                      mask_mode="both"))
    assert {u.kind for u in tokens.prompt_units} == {"image", "token"}


def test_spans_by_positions_and_by_text(tiny_vl, tall_image, tmp_path):
    plan = plan_for(tiny_vl, tmp_path, **two_images(tall_image, mask_spans=("5-9", 'text:"two images"',
                                                                             "text:pink")))
    spans = [u for u in plan.prompt_units if u.kind == "span"]
    assert spans[0].label == "5-9" and spans[0].positions == (5, 6, 7, 8, 9)
    # Inside image 0 (positions 4-18): cells (0,1)..(0,4) and (1,0), whose bounding box is 2 x 5 from (0,0).
    assert spans[0].token_type == "vision" and spans[0].image_index == 0
    assert (spans[0].grid_row, spans[0].grid_col, spans[0].grid_rows, spans[0].grid_cols) == (0, 0, 2, 5)
    text = plan.tokens.text
    assert spans[1].label == "two images" and "".join(text[p] for p in spans[1].positions) == " two images"
    assert "".join(text[p] for p in spans[2].positions) == " pink"
    mask = plan.hide_mask(0)
    assert mask.shape == (len(plan.prompt_units) + 0, plan.prompt_length)
    assert mask[-3].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]


@pytest.mark.parametrize("spec,message", [
    ("99-120", "past the prompt"), ('text:"a red car"', "does not occur in the prompt text")])
def test_a_span_that_does_not_fit_the_prompt_is_a_usage_error(tiny_vl, tmp_path, spec, message):
    with pytest.raises(UsageError, match=message):
        plan_for(tiny_vl, tmp_path, images=[], prompt="Short.", mask_spans=(spec,))


UNIT_CASES = [(unit, attention) for unit in ("word", "image", "region:2x2", "spans")
              for attention in ("bidirectional", "causal")]


@pytest.mark.parametrize("unit,vision_attention", UNIT_CASES)
def test_every_unit_variant_layer_and_step_equals_the_reference(tiny_vl, tall_image, tmp_path, unit,
                                                                vision_attention):
    options = {"mask_spans": ("5-9", 'text:"two images"')} if unit == "spans" else {"mask_unit": unit}
    settings = vl_settings(tiny_vl.name, tmp_path, vision_attention=vision_attention,
                           **two_images(tall_image, **options))
    analysis, _ = analyse_vl(tiny_vl, settings)
    assert all_errors(analysis) < TOLERANCE
    meta, table = analysis.metadata, analysis.table
    assert meta["steps"] == 3
    assert len(table) == sum(meta["units_per_step"]) * meta["num_layers"] * (2 + meta["num_heads"])
    assert not table[["l2_distance", "cosine_distance"]].isna().any().any()
    kinds = set(table.unit_kind.astype(str))
    assert kinds >= ({"span", "token"} if unit == "spans" else {unit.split(":")[0]})


def test_a_unit_of_one_position_gives_exactly_the_token_numbers(tiny_vl, tall_image, tmp_path):
    token, _ = analyse_vl(tiny_vl, vl_settings(tiny_vl.name, tmp_path, mask_mode="vision",
                                               **two_images(tall_image)))
    region, _ = analyse_vl(tiny_vl, vl_settings(tiny_vl.name, tmp_path, mask_mode="vision", mask_unit="region:1x1",
                                                **two_images(tall_image)))
    a, b = token.table, region.table
    assert list(a.token_position) == list(b.token_position) and set(b.unit_kind.astype(str)) == {"region"}
    assert np.array_equal(a.l2_distance, b.l2_distance) and np.array_equal(a.cosine_distance, b.cosine_distance)
    assert (a.grid_rows.to_numpy() == 1).all() and (b.grid_rows.to_numpy() == 1).all()


def test_token_unit_rows_keep_the_token_columns_and_values(tiny_vl, tmp_path):
    analysis, _ = analyse_vl(tiny_vl, vl_settings(tiny_vl.name, tmp_path, num_tokens=2))
    table = analysis.table
    assert (table.unit.astype(str) == table.token_masked.astype(str)).all()
    assert (table.unit_size == 1).all() and set(table.unit_kind.astype(str)) == {"token"}
    assert (table.unit_positions.astype(str) == table.token_position.astype(str)).all()
    vision = table[table.token_type == "vision"]
    assert (vision.grid_rows == 1).all() and (table[table.token_type == "text"].grid_rows == -1).all()
    units = analysis.metadata["units"]
    assert [u["from_step"] for u in units[-1:]] == [1]  # the generated token is a unit from step 1
    assert analysis.metadata["units_per_step"] == [len(units) - 1, len(units)]


def test_text_tool_words_and_spans_equal_the_reference_on_llama(tmp_path):
    from vl_masking.analysis import analyse
    from vl_masking.inputs import load_model
    from vl_masking.options import RunSettings
    from vl_masking.tiny_models import build_causal_lm

    model = build_causal_lm(tmp_path / "llama", model_type="llama")
    settings = RunSettings(model=str(model), prompt="The unbelievably bright piglet is pink", tool="text",
                           num_tokens=3, device="cpu", dtype="float32", chat=False, mask_unit="word",
                           vision_attention="causal", mask_spans=("1-3", "text:bright piglet"),
                           output_dir=str(tmp_path), check=1)  # keeps what the reference re-runs from
    loaded = load_model(settings)
    inputs, plan = prepare(loaded, settings)
    analysis = analyse(loaded, inputs, plan, settings, progress=False)
    assert all_errors(analysis) < TOLERANCE
    assert {"word", "span"} <= set(analysis.table.unit_kind.astype(str))


BAD_UNITS = {
    "region 0x2": ["--mask-unit", "region:0x2"],
    "region axb": ["--mask-unit", "region:axb"],
    "unknown unit": ["--mask-unit", "sentence"],
    "span backwards": ["--mask-span", "9-3"],
    "span past the prompt": ["--mask-span", "200-210"],
    "unmatched text span": ["--mask-span", 'text:"a red car"'],
    "image unit without image": ["--mask-unit", "image", "--mask-mode", "both"],
}


@pytest.mark.parametrize("case", sorted(BAD_UNITS))
def test_bad_unit_options_exit_2_with_one_line_before_the_model_loads(case, tiny_vl_dir, tmp_path):
    out = tmp_path / "out"
    image = [] if case == "image unit without image" else ["--image", PIGGY]
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, *image, "--prompt", "Describe this image.",
                   "--mask-mode", "both", *BAD_UNITS[case], "--output-dir", out)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Model:" not in proc.stdout and "Loading weights" not in proc.stderr  # before the weights load
    assert not out.exists()


TOKENIZERS = {"qwen3 (byte-level BPE)": TOKENIZER_DIR, "llama2 (SentencePiece)": ROOT / "tests" / "data" / "llama2_tokenizer"}


@pytest.mark.parametrize("tokenizer_dir", TOKENIZERS.values(), ids=TOKENIZERS.keys())
def test_a_named_target_is_its_texts_first_token_as_it_follows_the_prompt(tokenizer_dir):
    """An answer after a raw-text prompt is read with its space ("Paris" after "city of" is " Paris"), after a
    chat prompt's new line as written; a text that has its space keeps it (and is not a lone space token)."""
    from transformers import AutoTokenizer

    from vl_masking.targets import target_token

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def following(prompt, text):  # the token after the prompt when the text is written after it
        ids = tok.encode(prompt, add_special_tokens=False)
        return ids, tok.encode(prompt + text, add_special_tokens=False)[len(ids)]

    completion = "The Eiffel Tower is located in the city of"
    ids, paris = following(completion, " Paris")
    assert tok.decode([paris]).strip() == "Paris"
    assert target_token(tok, 'text:"Paris"', ids) == target_token(tok, 'text:" Paris"', ids) == paris
    assert tok.decode([target_token(tok, 'text:" Paris"', ids)]).strip() != ""
    chat = "USER: Is the sky blue?\nASSISTANT:\n"
    ids, yes = following(chat, "yes")
    assert target_token(tok, 'text:"yes"', ids) == yes
    assert target_token(tok, "predicted", ids) is None
    ids, france = following("Paris is", " France")  # a prompt shorter than the usual tail
    assert target_token(tok, 'text:"France"', ids) == france
    for special in (tok.eos_token, *tok.all_special_tokens):  # a special token is itself, never a space before it
        assert target_token(tok, f'text:"{special}"', ids) == tok.convert_tokens_to_ids(special), special
