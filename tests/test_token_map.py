"""The token map: text as a reader expects it, types, image index and grid cells from image_grid_thw."""

import numpy as np

from conftest import PIGGY, analyse_vl, vl_settings


def test_grid_cells_follow_image_grid_thw_for_a_non_square_image(tiny_vl, tmp_path):
    analysis, inputs = analyse_vl(tiny_vl, vl_settings(tiny_vl.name, tmp_path, num_tokens=1))
    t, h, w = inputs.model_kwargs["image_grid_thw"][0].tolist()
    rows, cols = h // 2, w // 2
    assert (rows, cols) == (3, 5)  # 160x96 pixels: never a square root
    vision = analysis.table[(analysis.table.token_type == "vision") & (analysis.table.variant == "Full")
                            & (analysis.table.layer == 0)]
    start = analysis.metadata["images"][0]["token_start"]
    i = vision.token_position.to_numpy() - start
    assert np.array_equal(vision.grid_row.to_numpy(), i // cols)
    assert np.array_equal(vision.grid_col.to_numpy(), i % cols)
    assert vision.grid_row.max() == rows - 1 and vision.grid_col.max() == cols - 1
    assert analysis.metadata["images"][0]["grid_rows"] == 3 and analysis.metadata["images"][0]["grid_cols"] == 5


def test_two_images_get_their_own_index_span_and_grid(tiny_vl, tall_image, tmp_path):
    settings = vl_settings(tiny_vl.name, tmp_path, num_tokens=1, images=[str(PIGGY), str(tall_image)])
    analysis, inputs = analyse_vl(tiny_vl, settings)
    rows = analysis.table[(analysis.table.variant == "Full") & (analysis.table.layer == 0)]
    for k, thw in enumerate(inputs.model_kwargs["image_grid_thw"].tolist()):
        g_rows, g_cols = thw[1] // 2, thw[2] // 2
        cells = rows[rows.image_index == k]
        assert len(cells) == g_rows * g_cols
        assert set(zip(cells.grid_row, cells.grid_col)) == {(r, c) for r in range(g_rows) for c in range(g_cols)}
        span = analysis.metadata["images"][k]
        assert (span["grid_rows"], span["grid_cols"]) == (g_rows, g_cols)
        assert cells.token_position.min() == span["token_start"] and cells.token_position.max() == span["token_end"] - 1
    assert (analysis.metadata["images"][1]["grid_rows"], analysis.metadata["images"][1]["grid_cols"]) == (4, 2)
    text = rows[rows.token_type == "text"]
    assert (text[["image_index", "grid_row", "grid_col"]] == -1).all().all()


def test_token_text_is_decoded_and_special_tokens_keep_their_names(tiny_vl, tmp_path):
    analysis, _ = analyse_vl(tiny_vl, vl_settings(tiny_vl.name, tmp_path, num_tokens=1))
    tokens = analysis.metadata["final_tokens"]
    assert tokens[:4] == ["<|im_start|>", "user", "\n", "<|vision_start|>"]
    assert "<|image_pad|>" in tokens and "<|vision_end|>" in tokens
    assert " this" in tokens and "Ġthis" not in tokens
    table = analysis.table
    assert set(table[table.token_type == "vision"].token_masked.astype(str)) == {"<|image_pad|>"}
