"""Generated tokens: causal equals model.generate; bidirectional equals a from-scratch 4D-mask forward."""

import torch
from transformers import AutoModelForImageTextToText

from conftest import PIGGY, analyse_vl, vl_settings
from vl_masking.reference import base_allowed
from vl_masking.tiny_models import IM_END_ID, build_qwen3_vl


def _fresh_sdpa_model(path):
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def test_causal_generation_equals_model_generate(tiny_vl, tiny_vl_dir, tall_image, tmp_path):
    settings = vl_settings(tiny_vl_dir, tmp_path, vision_attention="causal", num_tokens=4,
                           images=[str(PIGGY), str(tall_image)])
    analysis, inputs = analyse_vl(tiny_vl, settings)
    model = _fresh_sdpa_model(tiny_vl_dir)
    expected = model.generate(**inputs.model_kwargs, max_new_tokens=4, do_sample=False)
    assert analysis.metadata["generated_ids"] == expected[0, inputs.input_ids.shape[1]:].tolist()
    assert analysis.metadata["final_ids"] == expected[0].tolist()


def test_bidirectional_generation_equals_full_forward_with_4d_mask_at_every_step(tiny_vl, tiny_vl_dir, tall_image,
                                                                                 tmp_path):
    settings = vl_settings(tiny_vl_dir, tmp_path, vision_attention="bidirectional", num_tokens=4,
                           images=[str(PIGGY), str(tall_image)])
    analysis, inputs = analyse_vl(tiny_vl, settings)
    model = _fresh_sdpa_model(tiny_vl_dir)
    kwargs = inputs.model_kwargs
    prompt_len = inputs.input_ids.shape[1]
    blocks = torch.from_numpy(_image_index(analysis))
    final = torch.tensor(analysis.metadata["final_ids"])[None]
    for step, token in enumerate(analysis.metadata["generated_ids"]):
        length = prompt_len + step
        ids = final[:, :length]
        mm = torch.zeros_like(ids)
        mm[:, :prompt_len] = kwargs["mm_token_type_ids"]
        position_ids, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=kwargs["image_grid_thw"],
                                                     attention_mask=torch.ones_like(ids))
        allowed = base_allowed(length, blocks)
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[None, None]
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=kwargs["pixel_values"], image_grid_thw=kwargs["image_grid_thw"],
                           mm_token_type_ids=mm, attention_mask=mask, position_ids=position_ids).logits
        assert int(logits[0, -1].argmax()) == token, f"step {step}"


def _image_index(analysis):
    import numpy as np

    index = np.full(analysis.metadata["prompt_length"], -1, dtype=np.int64)
    for img in analysis.metadata["images"]:
        index[img["token_start"]:img["token_end"]] = img["index"]
    return index


def _stop_after(model_dir, stop_step, inputs):
    """Rewrite lm_head so greedy decoding emits token 0 until step `stop_step`, then <|im_end|>."""
    model = _fresh_sdpa_model(model_dir)
    head = model.lm_head.weight.data
    head.zero_()
    hidden = []
    ids = inputs.model_kwargs["input_ids"]
    for step in range(stop_step + 1):
        seq = torch.cat([ids, torch.zeros(1, step, dtype=ids.dtype)], dim=1)
        mm = torch.zeros_like(seq)
        mm[:, : ids.shape[1]] = inputs.model_kwargs["mm_token_type_ids"]
        with torch.no_grad():
            out = model.model(input_ids=seq, pixel_values=inputs.model_kwargs["pixel_values"],
                              image_grid_thw=inputs.model_kwargs["image_grid_thw"], mm_token_type_ids=mm,
                              attention_mask=torch.ones_like(seq))
        hidden.append(out.last_hidden_state[0, -1])
    h = torch.stack(hidden)  # solve w . h_s = -1 before the stop step, +5 at it
    target = torch.full((stop_step + 1,), -1.0)
    target[-1] = 5.0
    head[IM_END_ID] = torch.linalg.lstsq(h, target[:, None]).solution[:, 0]
    model.save_pretrained(model_dir)


def test_generation_stops_early_at_im_end_and_records_the_reason(tmp_path):
    from vl_masking.api import run
    from vl_masking.api import prepare
    from vl_masking.inputs import load_model

    model_dir = build_qwen3_vl(tmp_path / "stopper", layers=2)
    settings = vl_settings(model_dir, tmp_path, vision_attention="causal", num_tokens=6)
    loaded = load_model(settings)
    _stop_after(model_dir, 2, prepare(loaded, settings)[0])
    result = run(settings, progress=False, log=lambda *a: None)
    meta = result.metadata
    assert meta["generated_ids"] == [0, 0, IM_END_ID]
    assert meta["stop_reason"] == "eos"
    assert meta["steps"] == 3
    assert sorted(result.table.generation_step.unique()) == [0, 1, 2]
    assert meta["generated_text"].endswith("<|im_end|>")
