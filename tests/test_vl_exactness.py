"""The batched engine equals the reference (the model's own layer re-run with a -inf column).

Error measure: |distance_ours - distance_ref| relative to the norm of the measured vector
(and the absolute difference for cosine distance), every variant, layer, position and step.
"""

import pytest
import torch

from conftest import PIGGY, all_errors, analyse_vl, vl_settings

TOLERANCE = 1e-5

PROMPTS = {
    "text_only": dict(images=[], prompt="The capital of France is"),
    "one_image": dict(images=[str(PIGGY)]),
    "two_images": "two",
}


def _prompt(name, tall_image):
    if name == "two_images":
        return dict(images=[str(PIGGY), str(tall_image)], prompt="Compare the two images.")
    return PROMPTS[name]


CASES = [(p, m, v) for p in PROMPTS for m in ("text", "vision", "both") for v in ("bidirectional", "causal")
         if not (p == "text_only" and (m == "vision" or v == "bidirectional"))]


@pytest.mark.parametrize("prompt,mask_mode,vision_attention", CASES)
def test_every_variant_layer_position_and_step_equals_reference(tiny_vl, tall_image, tmp_path, prompt, mask_mode,
                                                                 vision_attention):
    settings = vl_settings(tiny_vl.name, tmp_path, mask_mode=mask_mode, vision_attention=vision_attention,
                           **_prompt(prompt, tall_image))
    analysis, _ = analyse_vl(tiny_vl, settings)
    assert len(analysis.measure.records) == analysis.metadata["steps"] * analysis.metadata["num_layers"]
    assert analysis.metadata["steps"] == 3
    assert all_errors(analysis) < TOLERANCE
    assert not analysis.table[["l2_distance", "cosine_distance"]].isna().any().any()


def test_bidirectional_prompt_changes_later_layers_only_through_the_cache(tiny_vl, tmp_path):
    """Same last query row at layer 0, different K/V afterwards: the two modes must differ somewhere."""
    causal, _ = analyse_vl(tiny_vl, vl_settings(tiny_vl.name, tmp_path, vision_attention="causal", num_tokens=1))
    bidir, _ = analyse_vl(tiny_vl, vl_settings(tiny_vl.name, tmp_path, vision_attention="bidirectional",
                                               num_tokens=1))
    c, b = causal.table, bidir.table
    layer0 = (c.layer == 0).to_numpy()
    assert torch.allclose(torch.tensor(c.l2_distance[layer0].to_numpy()), torch.tensor(b.l2_distance[layer0].to_numpy()))
    assert not torch.allclose(torch.tensor(c.l2_distance.to_numpy()), torch.tensor(b.l2_distance.to_numpy()))
    assert bidir.metadata["vision_attention"] == "bidirectional"


def test_chunking_masked_positions_under_a_small_memory_budget_changes_nothing(tiny_vl, tmp_path):
    whole, _ = analyse_vl(tiny_vl, vl_settings(tiny_vl.name, tmp_path, num_tokens=2))
    chunked, _ = analyse_vl(tiny_vl, vl_settings(tiny_vl.name, tmp_path, num_tokens=2, memory_budget_mb=0.01))
    a, b = whole.table, chunked.table
    assert len(a) == len(b)
    for column in ("l2_distance", "cosine_distance"):
        assert torch.allclose(torch.tensor(a[column].to_numpy()), torch.tensor(b[column].to_numpy()),
                              rtol=1e-5, atol=1e-7)


def test_mixture_of_experts_full_variant_runs_the_layers_own_router(tmp_path):
    """Qwen3-VL-MoE: Full applies the sparse MoE block to the masked rows, so routing is reproduced."""
    from vl_masking.inputs import load_model
    from vl_masking.tiny_models import build_qwen3_vl

    model_dir = build_qwen3_vl(tmp_path / "moe", layers=2, moe_experts=4)
    settings = vl_settings(model_dir, tmp_path, num_tokens=2)
    loaded = load_model(settings)
    assert "Moe" in type(loaded.model.model.language_model.layers[0].mlp).__name__
    analysis, _ = analyse_vl(loaded, settings)
    assert all_errors(analysis) < TOLERANCE


def test_out_of_memory_halves_the_chunk_and_the_run_continues(tiny_vl, tmp_path, monkeypatch):
    from vl_masking import knockout

    whole, _ = analyse_vl(tiny_vl, vl_settings(tiny_vl.name, tmp_path, num_tokens=1))
    real = knockout.head_outputs
    sizes = []

    def small_device(lq, logits, hide):
        sizes.append(hide.shape[0])
        if hide.shape[0] > 5:
            raise torch.OutOfMemoryError("simulated: chunk too large")
        return real(lq, logits, hide)

    monkeypatch.setattr(knockout, "head_outputs", small_device)
    halved, _ = analyse_vl(tiny_vl, vl_settings(tiny_vl.name, tmp_path, num_tokens=1))
    assert max(sizes) > 5 and sizes[-1] <= 5
    assert torch.allclose(torch.tensor(whole.table.l2_distance.to_numpy()),
                          torch.tensor(halved.table.l2_distance.to_numpy()), rtol=1e-5, atol=1e-7)
