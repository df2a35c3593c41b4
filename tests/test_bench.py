"""The engine benchmark runs end to end and reports all three methods."""

import importlib.util

import pytest

from conftest import ROOT


def load_bench(name: str):
    """The script bench/<name>.py as a module (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_engine_reports_generate_analysis_and_reference(tmp_path):
    bench = load_bench("bench_engine")
    out = tmp_path / "bench.json"
    result = bench.main(["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                         "--image-size", "128", "--steps", "2", "--repeats", "1", "--reference-samples", "2",
                         "--json", str(out)])
    assert out.exists()
    assert result["vision_tokens"] == 16 and result["steps"] == 2
    assert result["rows"] == sum(result["units_per_step"]) * 2 * (2 + 4)
    for key in ("generate_s", "prefill_floor_s", "analysis_s", "reference_s_extrapolated"):
        assert result[key] > 0


def test_bench_engine_flow_case_reports_ours_the_floor_and_the_reference(tmp_path):
    bench = load_bench("bench_engine")
    result = bench.main(["--measure", "flow", "--window", "3", "--layers", "3", "--hidden", "64", "--heads", "4",
                         "--kv-heads", "2", "--head-dim", "16", "--image-size", "128", "--steps", "1", "--repeats", "1",
                         "--reference-samples", "2", "--json", str(tmp_path / "flow.json")])
    assert result["measure"] == "flow" and result["windows"] == 3 and result["row_layers_per_unit"] == 3 + 3 + 2
    assert result["reference_configurations"] == result["units_per_step"][0] * 3
    for key in ("flow_analysis_s", "flow_floor_s", "reference_s_extrapolated"):
        assert result[key] > 0


def test_bench_engine_video_case_runs_the_clip_through_the_layer_measure(tmp_path):
    """--video-frames 4 of 128 px at Qwen3-VL's default video budget (at least 128 x 32 x 32 pixels a clip: the
    frames grow to 192 px): 2 temporal patches of 6 x 6 tokens."""
    bench = load_bench("bench_engine")
    result = bench.main(["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                         "--image-size", "128", "--video-frames", "4", "--steps", "1", "--repeats", "1",
                         "--reference-samples", "1", "--json", str(tmp_path / "video.json")])
    assert result["video_frames"] == 4 and result["vision_tokens"] == 2 * 36
    for key in ("generate_s", "analysis_s", "reference_s_extrapolated"):
        assert result[key] > 0


def test_the_video_processor_check_compares_where_torchvision_exists_and_says_skipped_elsewhere(tmp_path):
    check = load_bench("check_video_processor")
    assert check.main(["--json", str(tmp_path / "check.json")]) == 0
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - no torchvision here: nothing to compare against
        return
    import json

    cases = json.loads((tmp_path / "check.json").read_text())["cases"]
    assert cases and all(case["identical"] for case in cases)


def test_bench_engine_attention_case_times_both_in_alternation_and_the_measures_own_work(tmp_path):
    bench = load_bench("bench_engine")
    result = bench.main(["--measure", "attention", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
                         "--head-dim", "16", "--image-size", "128", "--steps", "2", "--repeats", "2",
                         "--json", str(tmp_path / "attention.json")])
    assert result["measure"] == "attention" and result["rows"] == sum(result["units_per_step"]) * 2 * (1 + 4)
    first, second = result["rounds_s"]
    assert list(first)[0] == "generate" and list(second)[-1] == "generate"  # the order alternates
    for r in (first, second):  # the work inside a run excludes the generation it shares with plain generate
        assert 0 < r["analysis_work"] < r["analysis"] and 0 < r["first_work"] < r["first"]
    assert result["attention_work_over_generate"] > 1 and result["memory_attention_over_generate"] > 0
    fastest = min(r["analysis"] for r in result["rounds_s"]) / min(r["generate"] for r in result["rounds_s"])
    assert result["attention_fastest_over_generate"] == pytest.approx(fastest, rel=0.01)  # rounds_s is rounded


def test_bench_encoder_reports_ours_the_naive_reruns_and_one_tower_forward(tmp_path):
    bench = load_bench("bench_encoder")
    result = bench.main(["--depth", "2", "--hidden", "32", "--heads", "2", "--image-size", "64", "--naive-samples", "2",
                         "--json", str(tmp_path / "encoder.json")])
    assert (tmp_path / "encoder.json").exists()
    assert result["patches"] == 16 and result["units"] == 4 and result["blocks"] == 2
    for key in ("tower_forward_s", "encoder_s", "naive_s_extrapolated", "naive_over_encoder"):
        assert result[key] > 0


def test_bench_encoder_flow_reports_ours_without_the_prefix_reuse_and_one_forward_per_configuration(tmp_path):
    """A 3-block tower, windows of one block on 4 region units of a 64 px picture (2 x 2 cells): 4 x (3 windows +
    2 after the projector) configurations; the prefix skipped is blocks 0, 1 and 2 of 3 over the windows."""
    from test_flow import TOLERANCE

    bench = load_bench("bench_encoder_flow")
    result = bench.main(["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                         "--vision-depth", "3", "--vision-hidden", "32", "--vision-heads", "2", "--deepstack", "1",
                         "--image-size", "64", "--mask-unit", "token", "--encoder-window", "1",
                         "--naive-samples", "2", "--json", str(tmp_path / "encoder_flow.json")])
    assert (tmp_path / "encoder_flow.json").exists()
    assert result["units"] == 4 and result["windows"] == 3 and result["configurations"] == 4 * 5 == result["rows"]
    assert result["prefix_share"] == pytest.approx((0 + 1 + 2) / 3 / 3, abs=1e-3)
    assert result["reuse_largest_difference"] < TOLERANCE and result["flop_bound"] > 1
    for key in ("forward_s", "tower_forward_s", "encoder_flow_s", "no_prefix_reuse_s", "naive_s_extrapolated"):
        assert result[key] > 0


def test_bench_writers_times_every_format(tmp_path):
    bench = load_bench("bench_writers")
    result = bench.main(["--positions", "40", "--json", str(tmp_path / "writers.json")])
    assert result["rows"] == 40 * 36 * 34 * 3
    for fmt in ("parquet", "csv", "json"):
        assert result[f"{fmt}_write_s"] >= 0 and result[f"{fmt}_mb"] > 0
