"""A model that really looks: small Qwen3-VL and LLaVA models trained on pictures with planted evidence
(vl_masking/planted.py), and every measure judged by whether it finds the evidence's cell. The models train once
per source of planted.py and are cached in .cache/ (tests/planted_models.py)."""

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from planted_models import trained
from vl_masking import planted
from vl_masking.study import read_study

pytestmark = pytest.mark.planted
PICTURES = 24  # held-out pictures per family, each asked about both objects
LAYERS = 4  # the planted models' decoder layers
# The window of units->last per family, a finding about each model: the Qwen3-VL model reads the evidence in one
# layer (one-layer windows find it); a LLaVA model (trained on two threads) left p(answer) where it was for 6 of 23
# red squares at any window short of all four layers (W = 1 and W = 3 alike), so its window spans every layer.
WINDOWS = {"qwen3_vl": 1, "llava": 2 * LAYERS + 1}
STRAIGHT = {"qwen3_vl": 0.9, "llava": 0.75}  # units->last: the share of each question's pictures it localises
# The layer and the attention measure at the layer that reads the picture: the share of pictures where the layer
# measure ranks the evidence first, and where the attention weight ranks it among the first three (measured: Qwen3-VL
# 42 and 42 of 42; LLaVA, whose one window over every layer gives no reading layer but 0, 18 and 29 of 42).
LAYER_FIRST = {"qwen3_vl": 0.9, "llava": 0.3}
ATTENTION_TOP3 = {"qwen3_vl": 0.9, "llava": 0.45}


@pytest.fixture(scope="session", params=planted.FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def model(family):
    return trained(family)


@pytest.fixture(scope="session")
def pictures(family, tmp_path_factory):
    path = planted.write_pictures(tmp_path_factory.mktemp(f"pictures-{family}"), family, PICTURES, seed=1)
    return path, planted.read_lines(path)


def study(model, pictures, out, *options):
    """A study over pictures.jsonl: each picture's question, its answer as the target."""
    path, _ = pictures
    run_cli("mask_impact_vl.py", "--model", model, "--dataset", path, "--columns",
            "id=id,image=image,question=question,answer=answer", "--target", "answer", "--num-tokens", 1,
            "--mask-mode", "vision", "--output-dir", out, "--output", "study", *options, check=True)
    return out


def after_the_image(model, family) -> str:
    """The span from the picture's first token to the last position: `units->SPAN` blocks a cell from every later
    position (the later image tokens, the question, the last), not only from the last."""
    prompts, _ = planted.tool_prompts(model, family)
    spans = set()
    for ids in prompts.values():
        image = (ids[0] == planted.image_token_id(model)).nonzero().flatten()
        spans.add(f"{int(image[0])}-{ids.shape[1] - 1}")
    assert len(spans) == 1  # both questions' prompts have one layout
    return spans.pop()


@pytest.fixture(scope="session")
def flows(family, model, pictures, tmp_path_factory):
    """Per prompt attention: units->last in windows of WINDOWS[family] layers; and, over every layer (Neo et al.'s
    whole-model knockout), each cell blocked from the last position and from every later position, and the paths
    image->last, image->question, question->last."""
    out = {}
    for attention in ("causal", "bidirectional"):
        one = study(model, pictures, tmp_path_factory.mktemp(f"flow1-{family}-{attention}"), "--measure", "flow",
                    "--flow", "units->last", "--window", WINDOWS[family], "--vision-attention", attention)
        out[attention] = read_study(one / "study")
        out[f"{attention} directory"] = one / "study"
    every = study(model, pictures, tmp_path_factory.mktemp(f"flow9-{family}"), "--measure", "flow",
                  "--flow", "units->last", "--flow", f"units->{after_the_image(model, family)}",
                  "--flow", "image->last", "--flow", "image->question", "--flow", "question->last",
                  "--window", 2 * LAYERS + 1, "--vision-attention", "causal")
    out["every"] = read_study(every / "study")
    return out


def test_the_planted_models_answer_held_out_questions(family, model, flows, pictures):
    """Greedy first-token accuracy of at least 95% per question, through the tool's own prompt (a study's
    `correct` column), and the training's own count on 200 other pictures."""
    _, lines = pictures
    measured = json.loads((model / "planted.json").read_text())
    print(f"\n{family}: trained in {measured['train_seconds']} s, {measured['steps']} steps; "
          f"training's held-out accuracy {measured['accuracy']}")
    rows = flows["causal"].drop_duplicates("example_id")
    rows["object"] = [lines[str(e)]["object"] for e in rows.example_id]
    by_object = rows.groupby("object").correct.mean()
    print(f"{family}: the tool's greedy accuracy per question {by_object.round(3).to_dict()} "
          f"({len(rows)} questions)")
    assert (by_object >= 0.95).all() and len(by_object) == 2
    assert all(a >= 0.95 for a in measured["accuracy"].values())


def localised(family, rows, lines, what):
    found = planted.flow_localisation(rows, lines)
    for r in found:
        print(f"{family} {what} {r['example']}: window {r['window']}, drop {r['drop_pct']}%, top cell {r['top_cell']}, "
              f"evidence {r['evidence']}, rank {r['rank']}")
    rates = {obj: np.mean([r["hit"] for r in found if r["object"] == obj]) for obj in planted.OBJECTS}
    print(f"{family} {what}: the evidence cell ranks first in " + ", ".join(
        f"{sum(r['hit'] for r in found if r['object'] == o)} of {sum(r['object'] == o for r in found)} {o}s"
        for o in planted.OBJECTS))
    return found, rates


def test_flow_puts_the_largest_drop_on_the_evidence_cell(family, flows, pictures):
    """Each cell blocked in windows of layers, the model's own causal prompt attention: in the window with the
    largest drop of p(answer), the cell that drops it most is the asked object's, for at least 90% of the pictures
    of each question (so asking about the other object moves the drop to that object's cell).

    Blocked from every later position, it is, for both models. Blocked from the last position only (units->last),
    it must be for the Qwen3-VL model and for STRAIGHT["llava"] of the LLaVA model's: a LLaVA model trained on two
    threads sent its red squares to the answer through the later image tokens (which attend to the square's token
    before the last position does), where units->last moves nothing; blocking the later positions too finds at
    least as many evidence cells. (A LLaVA model trained with transformers 5.25 reads one red square, answered at
    p 0.97, from another cell: both readings miss it; a finding of that model, printed.)"""
    _, lines = pictures
    rows = flows["every"]
    rest = [f for f in rows.flow.astype(str).unique() if f.startswith("units->") and f != "units->last"][0]
    relayed, relayed_rates = localised(family, rows[rows.flow.astype(str) == rest], lines, rest)
    straight, straight_rates = localised(family, flows["causal"][flows["causal"].flow.astype(str) == "units->last"],
                                         lines, f"units->last (W={WINDOWS[family]})")
    assert all(len([r for r in relayed if r["object"] == o]) >= 20 for o in planted.OBJECTS)  # 20 per question
    assert min(relayed_rates.values()) >= 0.9, relayed_rates
    assert min(straight_rates.values()) >= STRAIGHT[family], straight_rates
    hit = {r["example"]: r["hit"] for r in relayed}
    assert sum(hit.values()) >= sum(r["hit"] for r in straight)  # the later tokens add paths, never remove one
    print(f"{family}: units->last misses {[r['example'] for r in straight if not r['hit']]}; of them found through "
          f"the later tokens {[r['example'] for r in straight if not r['hit'] and hit[r['example']]]}")
    both = {}  # pictures with both objects: each question's top cell is its own object's
    for r in relayed:
        both.setdefault(r["example"].rsplit("-", 1)[0], []).append(r)
    pairs = [p for p in both.values() if len(p) == 2]
    moved = np.mean([all(r["hit"] for r in p) and p[0]["top_cell"] != p[1]["top_cell"] for p in pairs])
    print(f"{family}: the other question moves the drop to the other object in {moved:.0%} of {len(pairs)} pictures")
    assert len(pairs) >= 10 and moved >= 0.9
    windows = Counter(r["window"] for r in straight)
    print(f"{family}: units->last, the window with the largest drop, per picture: {dict(sorted(windows.items()))}")


def test_blocking_the_evidence_hurts_more_than_as_many_random_cells(family, flows, pictures):
    """Neo et al. (ICLR 2025): the evidence's cells blocked (from every later position, in every layer) drop
    p(answer) more than as many other cells drawn at random, in at least 95% of the pictures."""
    _, lines = pictures
    rows = flows["every"]
    rest = [f for f in rows.flow.astype(str).unique() if f.startswith("units->") and f != "units->last"][0]
    rows = rows[(rows.flow.astype(str) == rest) & (rows.token_type.astype(str) == "vision")]
    rng = np.random.default_rng(0)
    wins = []
    for example, part in rows.groupby(rows.example_id.astype(str)):
        evidence = [tuple(c) for c in lines[example]["evidence"]]
        if not evidence:
            continue
        cell = part.set_index([part.grid_row.astype(int), part.grid_col.astype(int)]).rel_change_pct
        cell = cell.groupby(level=[0, 1]).mean()  # one window over every layer: one row per cell
        others = [c for c in cell.index if c not in evidence]
        drawn = [others[k] for k in rng.choice(len(others), size=len(evidence), replace=False)]
        wins.append(cell[evidence].sum() < cell[drawn].sum())
    print(f"{family}: blocking the evidence beats {len(evidence)} random cell(s) in {sum(wins)} of {len(wins)}")
    assert np.mean(wins) >= 0.95


def test_the_paths_from_the_picture_to_the_answer(family, flows, pictures):
    """Which path the model uses: the picture straight to the last position (image->last), or through the
    question's tokens (image->question, then question->last). Blocked in every layer."""
    _, lines = pictures
    rows = flows["every"]
    present = rows.example_id.astype(str).map(lambda e: bool(lines[e]["evidence"]))
    change = rows[present & (rows.unit_kind.astype(str) == "group")].groupby(rows.flow.astype(str)).rel_change_pct
    mean = change.mean()
    print(f"{family}: mean change of p(answer) with the path blocked in every layer: {mean.round(1).to_dict()}")
    assert mean["image->last"] < -50  # the picture reaches the answer straight at the last position
    assert mean["image->last"] < mean["image->question"]


def test_the_default_bidirectional_image_attention_is_a_mask_the_model_never_saw(family, model, flows, pictures,
                                                                                   tmp_path):
    """Both prompt attentions on a model trained causally: how often the default (bidirectional among an image's
    tokens) changes the answer, and how well flow finds the evidence under each; the console says which to use."""
    path, lines = pictures
    picture = path.parent / next(iter(lines.values()))["image"]
    for attention, said in (("bidirectional", True), ("causal", False)):
        proc = run_cli("mask_impact_vl.py", "--model", model, "--image", picture, "--prompt", "What color is the square?",
                       "--num-tokens", 1, "--layers", 0, "--vision-attention", attention, "--output-dir", tmp_path,
                       "--output", attention, check=True)
        assert ("is measured as it is with --vision-attention causal" in proc.stdout) == said, proc.stdout
    for attention in ("causal", "bidirectional"):
        rows = flows[attention]
        accuracy = rows.drop_duplicates("example_id").correct.mean()
        found = planted.flow_localisation(rows[rows.flow.astype(str) == "units->last"], lines)
        print(f"{family} {attention}: accuracy {accuracy:.3f}, evidence first in "
              f"{np.mean([r['hit'] for r in found]):.3f} of {len(found)}")
    causal = flows["causal"].drop_duplicates("example_id").set_index("example_id").predicted_token.astype(str)
    other = flows["bidirectional"].drop_duplicates("example_id").set_index("example_id").predicted_token.astype(str)
    changed = (causal != other.reindex(causal.index)).mean()
    print(f"{family}: the bidirectional mask changes {changed:.1%} of the answers")
    assert flows["causal"].drop_duplicates("example_id").correct.mean() >= 0.95


@pytest.fixture(scope="session")
def measures(family, model, pictures, tmp_path_factory):
    """The layer and the attention measure of every picture's question, from one generation each."""
    out = study(model, pictures, tmp_path_factory.mktemp(f"measures-{family}"), "--measure", "layer,attention",
                "--vision-attention", "causal")
    return {m: read_study(out / f"study.{m}") for m in ("layer", "attention")}


def test_the_layer_and_attention_measures_at_the_layers_that_read_the_picture(family, flows, measures, pictures):
    """The evidence cell's rank among the 16 image cells, at the layer where flow finds that the last position
    reads the picture (each picture's window with the largest drop, W = 1: the layer whose attention to the cell
    matters): by the layer measure (how far hiding the cell moves that layer's update, Full) and by the attention
    measure (the heads' mean attention weight on the cell)."""
    _, lines = pictures
    rows = flows["causal"] if WINDOWS[family] == 1 else flows["every"]
    reading = {r["example"]: r["window"] for r in planted.flow_localisation(
        rows[rows.flow.astype(str) == "units->last"], lines)}
    layer = measures["layer"][measures["layer"].variant.astype(str) == "Full"]
    attention = measures["attention"][measures["attention"].variant.astype(str) == "Mean"]
    ranks = {}
    for name, table, value in (("layer", layer, "l2_distance"), ("attention", attention, "attention")):
        every = planted.evidence_rank(table, lines, value, range(LAYERS))
        at = [r["rank"] for r in every if reading.get(r["example"]) == r["layer"]]
        per_layer = pd.DataFrame(every).groupby("layer")["rank"].agg(lambda x: float(np.mean(np.array(x) == 1)))
        ranks[name] = at
        print(f"{family} {name}: evidence first at the reading layer in {sum(r == 1 for r in at)} of {len(at)}, "
              f"ranks {sorted(Counter(at).items())}; first per layer (every picture) {per_layer.round(2).to_dict()}")
    assert np.mean(np.array(ranks["layer"]) == 1) >= LAYER_FIRST[family]
    assert np.mean(np.array(ranks["attention"]) <= 3) >= ATTENTION_TOP3[family]


def test_the_studys_grouped_figure_shows_where_the_evidence_is(family, flows, tmp_path):
    """figures STUDY --group-by object --evidence evidence_row,evidence_col: per question, the mean change of
    p(answer) when each example's evidence cell is blocked, against the other image cells."""
    from vl_masking.figures import main

    written = main([str(flows["causal directory"]), "--group-by", "object", "--evidence", "evidence_row,evidence_col",
                    "--out", str(tmp_path)], log=lambda _: None)
    assert any(p.endswith("_curves.png") for p in written)
    summary = pd.read_csv(tmp_path / "study_by_object.summary.csv")
    low = summary.groupby(["object", "group"])["mean"].min().unstack()
    print(f"{family}: the lowest mean change per question: {low.round(1).to_dict('index')}")
    # measured: the evidence cell's mean at its lowest window -33% to -43% (the examples' best windows differ, so a
    # window's mean mixes drops of -100% with none), the other cells' 0.0%
    assert (low["the evidence cell"] < -25).all() and (low["other image cells"] > -5).all()


# -- inside the vision tower -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tower(family, model, pictures, tmp_path_factory):
    """From one generation per question: encoder-flow (one-block windows) and the encoder measure; the model's
    own causal prompt attention."""
    measures = ["encoder-flow", "encoder"]
    out = study(model, pictures, tmp_path_factory.mktemp(f"tower-{family}"), "--measure", ",".join(measures),
                "--encoder-window", 1, "--vision-attention", "causal")
    return {m: read_study(out / f"study.{m}") for m in measures}


@pytest.fixture(scope="session")
def deepstack(tmp_path_factory):
    """DeepStack (the Qwen3-VL model's only: LLaVA has none) on the same held-out pictures; (rows, lines)."""
    path = planted.write_pictures(tmp_path_factory.mktemp("pictures-deepstack"), "qwen3_vl", PICTURES, seed=1)
    pictures = (path, planted.read_lines(path))
    out = study(trained("qwen3_vl"), pictures, tmp_path_factory.mktemp("deepstack"), "--measure", "deepstack",
                "--vision-attention", "causal")
    return read_study(out / "study"), pictures[1]


def test_encoder_flow_finds_the_evidence_where_it_removes_the_cells_tokens(family, tower, pictures):
    """The pre-fusion ablation (the unit's image tokens replaced by the picture's mean, or zero, after the
    projector) puts the largest drop of p(answer) on the evidence cell in at least 90% of each question's
    pictures. The knockout inside the tower (the cell's patches hidden from every query in one block) is a finding
    reported as measured: the cell's own patches still carry the object through the residual stream to the
    projector, so it measures what the tower mixes across patches, which this task hardly needs: on the Qwen3-VL
    model (a cell is one 2x2 merge block) it moves p(answer) by less than 0.01% anywhere."""
    _, lines = pictures
    rows = tower["encoder-flow"]
    for series in ("mean after projector", "zero after projector"):
        _, rates = localised(family, rows[rows.flow.astype(str) == series], lines, series)
        assert min(rates.values()) >= 0.9, (series, rates)
    knockout, rates = localised(family, rows[rows.flow.astype(str) == "knockout"], lines, "knockout (W=1)")
    largest = max(abs(r["drop_pct"]) for r in knockout)
    print(f"{family} knockout in the tower: evidence first in {sum(r['hit'] for r in knockout)} of {len(knockout)}, "
          f"median drop {np.median([r['drop_pct'] for r in knockout]):.3f}%, largest {largest:.3f}%")
    if family == "qwen3_vl":
        assert largest < 0.01


def test_the_encoder_measure_sees_the_objects_but_not_the_question(family, tower, pictures):
    """The tower runs before the question: both questions of a picture get the same encoder rows. Hiding a cell
    that holds an object (the square, the circle, the triangle) moves a block's update more than a cell of
    background: the evidence cell is among the first three in at least 90% of the pictures at every block."""
    _, lines = pictures
    rows = tower["encoder"]
    full = rows[rows.variant.astype(str) == "Full"]
    per_question = {e: part.l2_distance.to_numpy() for e, part in full.groupby(full.example_id.astype(str))}
    for example, values in per_question.items():
        other = example.replace("square", "circle") if example.endswith("square") else example.replace("circle", "square")
        assert np.array_equal(values, per_question[other])
    blocks = sorted(set(full.layer))
    ranks = planted.evidence_rank(full, lines, "l2_distance", blocks)
    for block in blocks:
        at = [r["rank"] for r in ranks if r["layer"] == block]
        print(f"{family} encoder block {block}: evidence first in {sum(r == 1 for r in at)} of {len(at)}, among the "
              f"first three in {sum(r <= 3 for r in at)}")
        assert np.mean(np.array(at) <= 3) >= 0.9


def test_deepstack_carries_the_evidence_cells_colour_too(deepstack):
    """Qwen3-VL's DeepStack: removing a level's features at one cell drops p(answer) most at the evidence cell
    (over both levels, the larger drop) in at least 90% of the pictures; the drops are small (the image token
    itself still carries the colour), and the features' norm is of the order of the residual stream's."""
    rows, lines = deepstack
    family = "qwen3_vl"
    units = rows[rows.flow.astype(str) == "removed at the unit"]
    found, rates = localised(family, units, lines, "DeepStack removed")
    assert min(rates.values()) >= 0.9, rates
    every = rows[rows.flow.astype(str) == "removed at every image position"]
    print(f"{family} DeepStack removed at every image position, mean change of p per level: "
          f"{every.groupby('layer').rel_change_pct.mean().astype(float).round(2).to_dict()}; median injection ratio per level "
          f"{units.groupby('layer').injection_ratio.median().astype(float).round(2).to_dict()}")
    ranks = planted.evidence_rank(units, lines, "injection_ratio", sorted(set(units.layer)))
    print(f"{family} DeepStack injection ratio: evidence first in {sum(r['rank'] == 1 for r in ranks)} of {len(ranks)}")


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    """The Qwen3-VL model's video variant on held-out clips: each a folder of 8 frames (4 temporal patches), the
    square in one patch only; per clip, from one generation, each frame knocked out of the last position over every
    layer (frames->last) and the answer's base probability; and the picture model's answers to the same clips."""
    root = tmp_path_factory.mktemp("clips")
    lines = planted.read_lines(planted.write_clips(root, PICTURES, seed=1))
    found = {}
    for variant, model in (("video", trained("qwen3_vl", clips=True)), ("pictures", trained("qwen3_vl"))):
        found[variant] = clip_flows(model, root, lines)
    return found


def clip_flows(model, root, lines) -> list:
    """Per clip: the temporal patch whose knockout drops p(answer) most, the evidence's, whether the model answers."""
    from vl_masking.api import run
    from vl_masking.inputs import load_model
    from vl_masking.options import RunSettings

    loaded = None
    found = []
    for line in lines.values():
        settings = RunSettings(model=str(model), prompt=line["question"], videos=[str(root / line["video"])],
                               fps=planted.CLIP_FPS, max_frames=planted.CLIP_FRAMES, measure=("flow",), flows=("frames->last",),
                               window=2 * LAYERS + 1, target=f'text:"{line["answer"]}"', mask_mode="vision",
                               vision_attention="causal", device="cpu", dtype="float32", output_dir=str(root / "out"))
        loaded = loaded or load_model(settings)
        result = run(settings, save=False, progress=False, log=lambda *_: None, loaded=loaded)
        table = result.analyses[0].table
        drops = table[table.layer == table.layer.min()].sort_values("rel_change_pct", kind="stable")
        target = result.analyses[0].metadata["targets"][0]
        found.append({"clip": line["id"], "evidence": line["evidence_frame"],
                      "first": int(drops.image_index.iloc[0]) - int(table.image_index.min()),
                      "drop_pct": float(drops.rel_change_pct.iloc[0]), "correct": bool(target["correct"]),
                      "p_answer": float(target["base_prob"])})
    return found


def test_frames_to_last_finds_the_one_frame_that_shows_the_square(clips):
    """A clip of four temporal patches, the square in one: knocking each frame out of the last position (every
    layer, the frames->last flow) drops p(answer) most at the square's frame in at least 90% of the clips, for the
    model trained on clips. The model trained on pictures only (it never saw a video) is reported as measured."""
    for variant, found in clips.items():
        hits = [c["first"] == c["evidence"] for c in found]
        print(f"{variant} model, frames->last: the square's frame first in {sum(hits)} of {len(found)} clips; it "
              f"answers the square's colour in {sum(c['correct'] for c in found)} of {len(found)} (median p(answer) "
              f"{np.median([c['p_answer'] for c in found]):.3f}); median largest drop "
              f"{np.median([c['drop_pct'] for c in found]):.1f}%")
    video = clips["video"]
    assert np.mean([c["first"] == c["evidence"] for c in video]) >= 0.9, video
    assert np.mean([c["correct"] for c in video]) >= 0.9, video
