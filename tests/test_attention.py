"""The attention measure: the last query's softmax weight on each unit and the norm of the unit's contribution
(Kobayashi et al. 2020) equal what the model's own eager attention gives, for every unit kind, both vision
attention modes, a text model and Gemma 3's sliding windows; several measures share one generation."""

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import PIGGY, analyse_vl, run_cli, vl_settings
from vl_masking.api import prepare, run
from vl_masking.inputs import load_model
from vl_masking.options import RunSettings
from vl_masking.reference import reference_attention_error
from vl_masking.results import read_metadata, read_table
from vl_masking.tiny_models import build_gemma3

WEIGHT_TOLERANCE = 2e-6  # weights lie in [0, 1]: float32 rounding of a softmax and a sum
NORM_TOLERANCE = 1e-5  # relative to the norm


def quiet(*_args, **_kwargs):
    pass


def attention_run(settings):
    return run(settings, save=False, progress=False, log=quiet)


def eager_attentions(model_dir, model_class, forward_kwargs):
    """The model's own eager attention probabilities (per layer (H, S, S)) and each layer's values (KVH, S, d),
    from one forward pass with output_attentions=True."""
    import transformers

    model = getattr(transformers, model_class).from_pretrained(model_dir, attn_implementation="eager",
                                                               dtype=torch.float32).eval()
    from vl_masking.anatomy import decoder_layers

    values, hooks = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        hooks.append(layer.self_attn.v_proj.register_forward_hook(
            lambda m, a, out, i=i: values.__setitem__(i, out[0])))
    with torch.no_grad():
        out = model(**forward_kwargs, output_attentions=True, use_cache=False)
    for h in hooks:
        h.remove()
    layers = decoder_layers(model)
    return model, [a[0] for a in out.attentions], {
        i: v.view(v.shape[0], -1, layers[i].self_attn.head_dim).transpose(0, 1) for i, v in values.items()}


@torch.no_grad()
def expected(model, attentions, values, layer, positions):
    """(weights (H,), head norms (H,), block norm) of one unit at the last position, in float64."""
    from vl_masking.anatomy import decoder_layers

    alpha = attentions[layer][:, -1].double()  # (H, S)
    heads = alpha.shape[0]
    v = values[layer].double()
    v = v.repeat_interleave(heads // v.shape[0], dim=0)  # (H, S, d)
    index = list(positions)
    mixed = torch.einsum("hs,hsd->hd", alpha[:, index], v[:, index])
    weight = decoder_layers(model)[layer].self_attn.o_proj.weight.double()
    d = v.shape[-1]
    parts = torch.stack([weight[:, h * d:(h + 1) * d] @ mixed[h] for h in range(heads)])
    return alpha[:, index].sum(dim=1), parts.norm(dim=-1), parts.sum(dim=0).norm()


def compare_with_eager(table, meta, model_dir, model_class, kwargs_of_step):
    """Every row of an attention table against the model's output_attentions, step by step."""
    compared = 0
    units = {(u["kind"], tuple(u["positions"])): u for u in meta["units"]}
    for step in range(meta["steps"]):
        model, attentions, values = eager_attentions(model_dir, model_class, kwargs_of_step(step))
        rows = table[table.generation_step == step]
        for (layer, kind, positions), group in rows.groupby(["layer", "unit_kind", "unit_positions"], observed=True):
            positions = tuple(int(p) for p in str(positions).split(","))
            assert (str(kind), positions) in units
            weights, head_norms, block = expected(model, attentions, values, int(layer), positions)
            by_variant = group.set_index(group.variant.astype(str))
            heads = len(weights)
            ours_w = np.array([by_variant.attention[f"Head_{h}"] for h in range(heads)])
            ours_n = np.array([by_variant.attention_norm[f"Head_{h}"] for h in range(heads)])
            scale = max(float(block), 1e-12)
            assert np.abs(ours_w - weights.numpy()).max() < WEIGHT_TOLERANCE
            assert abs(by_variant.attention["Mean"] - float(weights.mean())) < WEIGHT_TOLERANCE
            assert np.abs(ours_n - head_norms.numpy()).max() < NORM_TOLERANCE * max(scale, float(head_norms.max()))
            assert abs(by_variant.attention_norm["Mean"] - float(head_norms.mean())) < NORM_TOLERANCE * scale
            if "Block" in by_variant.index:  # the whole block: the mean weight, the norm of the heads' sum
                assert abs(by_variant.attention["Block"] - float(weights.mean())) < WEIGHT_TOLERANCE
                assert abs(by_variant.attention_norm["Block"] - float(block)) < NORM_TOLERANCE * scale
            compared += 1
    assert compared == len(table) // (len(table.variant.cat.categories))
    return compared


def test_attention_equals_the_eager_attention_probabilities_of_a_text_model(tiny_text_dir, tmp_path):
    settings = RunSettings(model=str(tiny_text_dir), prompt="The quick brown fox jumps over", tool="text",
                           measure="attention", num_tokens=3, mask_unit="word", device="cpu", dtype="float32",
                           output_dir=str(tmp_path), chat=False, attention_variants=("Mean", "Block", "Heads"))
    result = attention_run(settings)
    table, meta = result.table, result.metadata
    assert meta["schema"]["measure"] == "attention" and meta["steps"] == 3
    assert meta["schema"]["series"]["order"][:3] == ["Mean", "Block", "Head_0"]
    ids = meta["final_ids"]

    def kwargs_of_step(step):
        input_ids = torch.tensor([ids[: meta["prompt_length"] + step]])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    assert compare_with_eager(table, meta, str(tiny_text_dir), "AutoModelForCausalLM", kwargs_of_step) > 30
    # weights of the units of a layer and head: a part of the softmax row (the generated units are in the
    # row too, so every step's total is below one only by the keys no unit covers)
    sums = table[table.variant.astype(str) == "Head_0"].groupby(["generation_step", "layer"]).attention.sum()
    assert (sums <= 1 + 1e-6).all() and (sums > 0.5).all()


def vl_forward_kwargs(loaded, settings, meta):
    """One full forward pass's inputs over the prompt plus the first `step` generated tokens."""
    inputs, _ = prepare(loaded, settings)
    ids = meta["final_ids"]

    def kwargs_of_step(step):
        input_ids = torch.tensor([ids[: meta["prompt_length"] + step]])
        kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        for name, value in inputs.model_kwargs.items():
            if name in ("input_ids", "attention_mask"):
                continue
            if name in inputs.position_kwargs:
                padded = torch.zeros_like(input_ids, dtype=value.dtype)
                padded[:, : meta["prompt_length"]] = value
                value = padded
            kwargs[name] = value
        return kwargs
    return kwargs_of_step


def test_attention_equals_the_eager_attention_probabilities_of_qwen3_vl(tiny_vl_dir, tiny_vl, tmp_path, tall_image):
    """Causal vision attention is the model's own: its output_attentions are the oracle, every row."""
    settings = vl_settings(tiny_vl_dir, tmp_path, images=[str(PIGGY), str(tall_image)], measure="attention",
                           vision_attention="causal", mask_unit="region:2x2", num_tokens=2,
                           attention_variants=("Mean", "Block", "Heads"))
    result = run(settings, save=False, progress=False, log=quiet, loaded=tiny_vl)
    table, meta = result.table, result.metadata
    assert set(table.unit_kind.astype(str)) >= {"region", "word"}
    compare_with_eager(table, meta, str(tiny_vl_dir), "AutoModelForImageTextToText",
                       vl_forward_kwargs(tiny_vl, settings, meta))


def all_attention_errors(analysis) -> float:
    """Every (step, layer) record of an attention analysis against the family's eager attention (reference)."""
    from vl_masking.measures.tables import written_values

    measure = analysis.measure
    return max(reference_attention_error(measure.loaded.model, analysis.capture, analysis.plan, step, layer,
                                         written_values(analysis.table, step, layer, ("attention", "attention_norm")))
               for step, layer, *_ in measure.records)


@pytest.mark.parametrize("unit,spans,variants", [
    ("token", (), ("Mean", "Block", "Heads")), ("token", (), ("Mean", "Heads")),
    ("word", ('text:"this image"',), ("Mean", "Block", "Heads")), ("image", (), ("Block",)),
    ("region:2x2", ("0-3",), ("Mean", "Block", "Heads")), ("region:2x2", (), ("Heads",))])
def test_every_unit_kind_equals_the_eager_reference_with_bidirectional_images(tiny_vl_dir, tiny_vl, tmp_path,
                                                                              tall_image, unit, spans, variants):
    settings = vl_settings(tiny_vl_dir, tmp_path, images=[str(PIGGY), str(tall_image)], measure="attention",
                           vision_attention="bidirectional", mask_unit=unit, mask_spans=spans, num_tokens=2,
                           attention_variants=variants)
    analysis, _ = analyse_vl(tiny_vl, settings)
    kinds = set(analysis.table.unit_kind.astype(str))
    assert {"span"} <= kinds if spans else True
    assert len(analysis.measure.records) == 2 * 3
    assert all((block is not None) == ("Block" in variants) for *_, block in analysis.measure.records)
    assert all_attention_errors(analysis) < 1e-5


def test_gemma3_sliding_windows_and_image_blocks_equal_the_eager_reference(tmp_path):
    path = build_gemma3(tmp_path / "gemma3", sliding_window=10)
    loaded = load_model(RunSettings(model=str(path), prompt="-", device="cpu", dtype="float32"))
    for unit in ("region:2x2", "token"):
        settings = vl_settings(path, tmp_path, measure="attention", mask_unit=unit, num_tokens=2,
                               attention_variants=("Mean", "Block", "Heads"))
        analysis, _ = analyse_vl(loaded, settings)
        assert all_attention_errors(analysis) < 1e-5


@pytest.mark.parametrize("unit,broken,variants", [("token", "position_grams", ("Mean", "Block", "Heads")),
                                                  ("token", "head_scales", ("Mean", "Heads")),
                                                  ("word", "head_grams", ("Mean", "Block", "Heads"))])
def test_a_broken_engine_is_caught_by_the_reference(tiny_vl_dir, tiny_vl, tmp_path, monkeypatch, unit, broken,
                                                    variants):
    """The oracle can fail: the norms of the wrong head (one head's numbers rolled onto the next) are caught,
    for token units (the block's per-position Gram matrices, the heads' per-position norms without Block) and
    for units of several positions (the heads' Gram matrices)."""
    from vl_masking.measures import attention

    original = getattr(attention, broken)
    roll = {"position_grams": lambda *a: original(*a).roll(1, dims=1).roll(1, dims=2),
            "head_scales": lambda *a: original(*a).roll(1, dims=1),
            "head_grams": lambda *a: original(*a).roll(1, dims=0)}[broken]
    monkeypatch.setattr(attention, broken, roll)
    monkeypatch.setattr(tiny_vl, "head_grams", {})  # made again, broken, instead of read from the earlier runs
    settings = vl_settings(tiny_vl_dir, tmp_path, measure="attention", num_tokens=1, mask_unit=unit, mask_mode="text",
                           attention_variants=variants)
    analysis, _ = analyse_vl(tiny_vl, settings)
    assert all_attention_errors(analysis) > 1e-3


def test_layer_and_attention_in_one_run_write_one_file_each_from_one_generation(tiny_vl_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--image", PIGGY, "--prompt", "Describe this image.",
                   "--measure", "layer,attention", "--mask-mode", "both", "--mask-unit", "region:2x2",
                   "--num-tokens", 2, "--device", "cpu", "--dtype", "float32", "--check", 3,
                   "--output-dir", out, "--output", "both")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"both.{m}.{ext}" for m in ("layer", "attention")
                           for ext in ("parquet", "csv", "meta.json", "json"))
    assert "Rows (layer):" in proc.stdout and "Rows (attention):" in proc.stdout
    assert "Check (attention): 3 random results" in proc.stdout
    layer_meta, attention_meta = (read_metadata(out / f"both.{m}.parquet") for m in ("layer", "attention"))
    assert layer_meta["run_id"] == attention_meta["run_id"]
    assert layer_meta["generated_ids"] == attention_meta["generated_ids"]
    assert attention_meta["check"]["max_error"] < 1e-5 and layer_meta["check"]["max_error"] < 1e-5
    assert attention_meta["schema"]["series"]["order"][:2] == ["Mean", "Head_0"]
    tables = [read_table(out / f"both.attention.{ext}") for ext in ("parquet", "csv", "json")]
    for other in tables[1:]:
        assert len(other) == len(tables[0])
        for column in ("attention", "attention_norm"):
            assert np.array_equal(other[column].to_numpy(np.float32), tables[0][column].to_numpy(np.float32))
    # the layer file is what a layer run alone writes
    alone = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--image", PIGGY, "--prompt", "Describe this image.",
                    "--mask-mode", "both", "--mask-unit", "region:2x2", "--num-tokens", 2, "--device", "cpu",
                    "--dtype", "float32", "--output-dir", out, "--output", "alone", "--formats", "parquet")
    assert alone.returncode == 0, alone.stderr
    pd.testing.assert_frame_equal(read_table(out / "alone.parquet"), read_table(out / "both.layer.parquet"))


@pytest.mark.parametrize("measure,column,variant", [("attention", "attention", "Mean"),
                                                    ("attention", "attention_norm", "Block"),
                                                    ("layer", "l2_distance", "Attn"),
                                                    ("flow", "prob", None), ("flow", "rel_change_pct", None)])
def test_check_compares_the_numbers_that_are_written(tiny_vl_dir, tiny_vl, tmp_path, monkeypatch, measure, column,
                                                     variant):
    """A table whose rows differ from what the engine computed (here: one column of one variant times 1.5)
    fails --check: the check reads the rows that go into the files."""
    from vl_masking.measures import MEASURES

    cls = MEASURES[measure]
    table = cls.table

    def scaled(self, token_map):
        frame = table(self, token_map)
        rows = frame["variant"].astype(str) == variant if variant else slice(None)
        frame.loc[rows, column] = frame.loc[rows, column] * 1.5
        return frame

    options = {"attention": dict(attention_variants=("Mean", "Block")), "layer": dict(variants=("Attn",)),
               "flow": dict(flows=("units->last",), window=1)}[measure]
    settings = vl_settings(tiny_vl_dir, tmp_path, measure=measure, num_tokens=1, mask_mode="text", check=8, **options)
    honest, _ = analyse_vl(tiny_vl, settings)
    assert honest.metadata["check"]["max_error"] < 1e-5
    monkeypatch.setattr(cls, "table", scaled)
    doctored, _ = analyse_vl(tiny_vl, settings)
    assert doctored.metadata["check"]["max_error"] > 1e-3


def test_check_recomputes_distinct_results_and_all_of_them_where_there_are_fewer(tiny_vl_dir, tiny_vl, tmp_path):
    from vl_masking.reference import check_draws

    assert sorted(check_draws([2, 0, 3], 10)) == [(0, 0), (0, 1), (2, 0), (2, 1), (2, 2)]
    assert check_draws([5, 7], 4) == check_draws([5, 7], 4) and len(set(check_draws([5, 7], 4))) == 4
    settings = vl_settings(tiny_vl_dir, tmp_path, measure="attention", num_tokens=2, mask_mode="text", check=50)
    analysis, _ = analyse_vl(tiny_vl, settings)
    checked = [(c["step"], c["layer"]) for c in analysis.metadata["check"]["checked"]]
    layers = tiny_vl.model.config.text_config.num_hidden_layers
    assert sorted(checked) == [(step, layer) for step in range(2) for layer in range(layers)]
