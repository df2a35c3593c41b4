"""Videos: inputs equal to the family's video processor, frame units and flows, every measure exact on a video
prompt, and bad videos refused before the model loads."""

import importlib.util
import sys
import types
from enum import Enum
from functools import partial
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PIGGY, run_cli, vl_settings
from test_viewers import browser, open_viewer  # noqa: F401 - the browser fixture
from vl_masking.inputs import load_model
from vl_masking.options import RunSettings
from vl_masking.tiny_models import (CLIP_SIZE, build_llava_onevision, build_qwen2_vl, build_qwen3_vl, painted_frame,
                                     write_clip)
from vl_masking.video import probe

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # with temporal patches; LLaVA-OneVision's tests are its own


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    """An odd frame count at 4 fps (mp4), a GIF, a webm whose stream does not count its frames, a folder of
    frames, and a 3-frame clip at 1 fps (so that 2 fps asks for more frames than the source has)."""
    root = tmp_path_factory.mktemp("videos")
    folder = root / "frames"
    folder.mkdir()
    for k in range(7):
        Image.fromarray(painted_frame(k)).save(folder / f"frame{k:03d}.png")
    return {"mp4": write_clip(root / "odd.mp4", "libx264", 9, 4),
            "gif": write_clip(root / "clip.gif", "gif", 6, 5, "rgb8"),
            "webm": write_clip(root / "clip.webm", "libvpx-vp9", 8, 4),
            "folder": folder,
            "slow": write_clip(root / "slow.mp4", "libx264", 3, 1)}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-models")
    return {"qwen3_vl": build_qwen3_vl(root / "qwen3_vl", layers=3),
            **{t: build_qwen2_vl(root / t, model_type=t) for t in ("qwen2_vl", "qwen2_5_vl")},
            "llava_onevision": build_llava_onevision(root / "llava_onevision", most_tiles=9)}


# -- the processor's own code, with the two torchvision calls it makes supplied ------------------------------

class InterpolationMode(Enum):
    NEAREST_EXACT, BOX, BILINEAR, HAMMING, BICUBIC, LANCZOS = ("nearest-exact", "box", "bilinear", "hamming",
                                                               "bicubic", "lanczos")


def torchvision_resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True, **_):
    """torchvision.transforms.v2.functional.resize_image on a CPU tensor: uint8 bilinear and bicubic run torch's
    native uint8 kernel; any other dtype as float, rounded back."""
    if tuple(size) == tuple(image.shape[-2:]):
        return image
    shape = image.shape
    flat = image.reshape(-1, *shape[-3:])
    native = image.dtype == torch.uint8 and interpolation in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
    out = torch.nn.functional.interpolate(flat if native else flat.float(), size=list(size),
                                          mode=interpolation.value, align_corners=False, antialias=antialias)
    if not native and image.dtype == torch.uint8:
        out = out.clamp_(0, 255).round_().to(torch.uint8)
    return out.reshape(*shape[:-2], *size)


def torchvision_normalize(tensor, mean, std, inplace=False):
    """torchvision's normalize: (x - mean) / std per channel, in the tensor's dtype."""
    mean = torch.as_tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return (tensor.sub_(mean) if inplace else tensor.sub(mean)).div_(std)


@pytest.fixture(scope="module")
def transformers_processors():
    """transformers' Qwen2VLVideoProcessor and Qwen3VLVideoProcessor, their modules run as written with
    torchvision's resize and normalize supplied (torchvision itself has no working CPU build here)."""
    import transformers
    import transformers.image_processing_backends as backends
    from transformers.image_utils import PILImageResampling

    import transformers.video_processing_utils as video_utils

    functional = types.SimpleNamespace(resize=torchvision_resize, normalize=torchvision_normalize,
                                       InterpolationMode=InterpolationMode,
                                       grayscale_to_rgb=lambda video: video if video.shape[-3] == 3 else
                                       video.expand(*video.shape[:-3], 3, *video.shape[-2:]))
    saved = {name: getattr(backends, name, None) for name in ("tvF", "pil_torch_interpolation_mapping")}
    saved_video = getattr(video_utils, "tvF", None)
    backends.tvF = video_utils.tvF = functional
    backends.pil_torch_interpolation_mapping = {PILImageResampling.BICUBIC: InterpolationMode.BICUBIC,
                                                PILImageResampling.BILINEAR: InterpolationMode.BILINEAR}
    root = Path(transformers.__file__).parent
    classes = {}
    # Qwen2-VL's module imports torchvision.transforms.v2.functional itself: it finds these two functions there,
    # for the time of its import only
    stand_ins = {"torchvision": types.ModuleType("torchvision"),
                 "torchvision.transforms": types.ModuleType("torchvision.transforms"),
                 "torchvision.transforms.v2": types.ModuleType("torchvision.transforms.v2"),
                 "torchvision.transforms.v2.functional": functional}
    stand_ins["torchvision"].transforms = stand_ins["torchvision.transforms"]
    stand_ins["torchvision.transforms"].v2 = stand_ins["torchvision.transforms.v2"]
    stand_ins["torchvision.transforms.v2"].functional = functional
    for family, file, name in (("qwen2", "qwen2_vl/video_processing_qwen2_vl.py", "Qwen2VLVideoProcessor"),
                               ("qwen3", "qwen3_vl/video_processing_qwen3_vl.py", "Qwen3VLVideoProcessor")):
        module_name = f"transformers.models.{file.split('/')[0]}.as_written_{family}"
        spec = importlib.util.spec_from_file_location(module_name, root / "models" / file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        absent = {name: sys.modules.get(name) for name in stand_ins}
        sys.modules.update(stand_ins)
        try:
            spec.loader.exec_module(module)
        finally:
            for stand_in, value in absent.items():
                if value is None:
                    sys.modules.pop(stand_in, None)
                else:
                    sys.modules[stand_in] = value
        module.tvF = functional
        classes[family] = getattr(module, name)
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    classes["onevision"] = LlavaOnevisionVideoProcessor  # BaseVideoProcessor's code, whose tvF is supplied above
    yield classes
    for name, value in saved.items():
        setattr(backends, name, value)
    video_utils.tvF = saved_video


def processor_inputs(processor_class, model_dir, clip: Path, fps, max_frames):
    """What the processor makes of the clip: decoded by transformers' own PyAV reader where the stream counts its
    frames, else (a webm, a folder) from all frames with their metadata, sampled by the processor."""
    from transformers.video_utils import VideoMetadata, read_video_pyav

    kwargs = {"cap_pixels_per_frame": False}
    if max_frames is not None:
        kwargs["max_frames"] = max_frames
    processor = processor_class.from_pretrained(str(model_dir), **kwargs)
    sampling = {"fps": fps} if fps is not None else {}
    if fps is None and max_frames is not None and processor.fps is None:
        sampling = {"num_frames": max_frames}
    sample = fps is not None or max_frames is not None or processor.do_sample_frames
    source = probe(str(clip))
    if clip.is_dir():
        frames = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(clip.iterdir())])
        metadata = VideoMetadata(total_num_frames=len(frames), fps=None)
    elif source.frames and av.open(str(clip)).streams.video[0].frames:
        frames, metadata = read_video_pyav(str(clip), sample_indices_fn=partial(processor.sample_frames, **sampling)
                                           if sample else (lambda metadata, **_: np.arange(metadata.total_num_frames)))
        out = processor(videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_metadata=True,
                        return_tensors="pt")
        return processor, out, metadata
    else:
        with av.open(str(clip)) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        metadata = VideoMetadata(total_num_frames=len(frames), fps=source.fps)
    out = processor(videos=[frames], video_metadata=[metadata], do_sample_frames=sample, return_metadata=True,
                    return_tensors="pt", **sampling)
    metadata = out["video_metadata"][0]
    if metadata.frames_indices is None:
        metadata.frames_indices = list(range(metadata.total_num_frames))
    return processor, out, metadata


def expected_video_text(family: str, processor, grid, metadata) -> str:
    """The prompt text for the video as the family's processor writes it."""
    merge = processor.merge_size ** 2
    t, h, w = (int(v) for v in grid)
    if family != "qwen3_vl":
        return "<|video_pad|>" * (t * h * w // merge)
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    writer = types.SimpleNamespace(video_processor=processor, vision_start_token="<|vision_start|>",
                                   vision_end_token="<|vision_end|>", video_token="<|video_pad|>")
    writer._calculate_timestamps = partial(Qwen3VLProcessor._calculate_timestamps, writer)
    return Qwen3VLProcessor.replace_video_token(writer, {"video_grid_thw": grid[None], "video_metadata": [metadata]},
                                                0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("clip,fps,max_frames", [("mp4", None, None), ("mp4", 2.0, None), ("slow", 2.0, None),
                                                 ("gif", None, 4), ("webm", 3.0, None), ("folder", None, 5)])
def test_video_inputs_equal_the_processors_algorithm(family, clip, fps, max_frames, clips, family_dirs,
                                                     transformers_processors):
    """Frames sampled, resized, normalised and laid out in patches exactly as the family's processor does (odd
    frame counts padded, fps above the source's, a GIF, a webm, a folder); the grid, Qwen3-VL's timestamps and
    Qwen2.5-VL's seconds per temporal patch too."""
    loaded = load_model(RunSettings(model=str(family_dirs[family]), prompt="-", device="cpu"), weights=False)
    processor_class = transformers_processors["qwen3" if family == "qwen3_vl" else "qwen2"]
    processor, expected, metadata = processor_inputs(processor_class, family_dirs[family], clips[clip], fps,
                                                     max_frames)
    ours = loaded.adapter.process_videos([probe(str(clips[clip]))], fps, max_frames)
    assert list(ours.clips[0].indices) == [int(i) for i in metadata.frames_indices]
    assert torch.equal(ours.kwargs["video_grid_thw"], expected["video_grid_thw"])
    assert ours.kwargs["pixel_values_videos"].dtype == expected["pixel_values_videos"].dtype
    assert torch.equal(ours.kwargs["pixel_values_videos"], expected["pixel_values_videos"])
    assert loaded.adapter.video_text(ours.views[0]) == expected_video_text(family, processor,
                                                                           expected["video_grid_thw"][0], metadata)
    if family == "qwen2_5_vl":
        # the processor's list of floats, as the model receives it (a float32 tensor)
        assert torch.equal(ours.kwargs["second_per_grid_ts"],
                           torch.tensor([processor.temporal_patch_size / metadata.sampled_fps]))


@pytest.mark.parametrize("clip,fps,max_frames", [("mp4", None, None), ("mp4", 2.0, None), ("slow", None, 5),
                                                 ("gif", None, 4), ("webm", 3.0, None), ("folder", None, 5)])
def test_llava_onevision_video_inputs_equal_the_processors_algorithm(clip, fps, max_frames, clips, family_dirs,
                                                                    transformers_processors):
    """LlavaOnevisionVideoProcessor's code on the same frames: every frame unless asked, --fps and --max-frames
    as its sample_frames takes fps and num_frames (at most the frames there are), the same resized and normalised
    pixels; and the prompt's video tokens, frames x pooled cells + 1, as its processor counts them."""
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
    from transformers.video_utils import VideoMetadata

    model = family_dirs["llava_onevision"]
    loaded = load_model(RunSettings(model=str(model), prompt="-", device="cpu"), weights=False)
    processor = transformers_processors["onevision"].from_pretrained(str(model))
    path = clips[clip]
    if path.is_dir():
        frames = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(path.iterdir())])
        source_fps = None
    else:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            source_fps = float(stream.average_rate)
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    total = len(frames)
    sampling = {"fps": fps} if fps is not None else {"num_frames": min(max_frames, total)} if max_frames else {}
    expected = processor(videos=[frames], video_metadata=[VideoMetadata(total_num_frames=total, fps=source_fps)],
                         do_sample_frames=bool(sampling), return_metadata=True, return_tensors="pt", **sampling)
    indices = expected["video_metadata"][0].frames_indices
    ours = loaded.adapter.process_videos([probe(str(path))], fps, max_frames)
    assert list(ours.clips[0].indices) == (list(range(total)) if indices is None else [int(i) for i in indices])
    assert torch.equal(ours.kwargs["pixel_values_videos"], expected["pixel_values_videos"])
    vision = loaded.config.vision_config
    writer = types.SimpleNamespace(num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
                                   video_token="<video>")
    assert loaded.adapter.video_text(ours.views[0]) == LlavaOnevisionProcessor.replace_video_token(writer, expected, 0)


def test_llava_onevision_takes_one_video_per_prompt_and_says_so_before_the_weights_load(clips, family_dirs,
                                                                                         tmp_path, monkeypatch):
    import vl_masking.api

    def no_weights(*_, **__):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(vl_masking.api, "load_weights", no_weights)
    proc = run_cli("mask_impact_vl.py", "--model", family_dirs["llava_onevision"], "--video", clips["mp4"],
                   "--video", clips["gif"], "--prompt", "What moves?", "--output-dir", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "takes 1 --video per prompt" in proc.stderr and not (tmp_path / "out").exists()


def test_frames_keep_their_order_and_each_temporal_patch_its_time(clips, family_dirs):
    """The sampled frames reach the model in source order, two per temporal patch, and each patch's time is the
    mean of its two frames' (a folder of frames: the processor's 24 frames per second)."""
    loaded = load_model(RunSettings(model=str(family_dirs["qwen3_vl"]), prompt="-", device="cpu"), weights=False)
    batch = loaded.adapter.process_videos([probe(str(clips["folder"]))], 24.0, 6)
    assert batch.clips[0].indices == (0, 1, 2, 4, 5, 6)  # linspace(0, 6, 6), rounded
    views = batch.views[0]
    assert [v.frames for v in views] == [(0, 1), (2, 4), (5, 6)]
    assert [v.time for v in views] == pytest.approx([0.5 / 24, 3 / 24, 5.5 / 24])
    assert [v.name for v in views] == ["frame 0", "frame 1", "frame 2"]
    grid_t, grid_h, grid_w = batch.kwargs["video_grid_thw"][0].tolist()
    patches = batch.kwargs["pixel_values_videos"].reshape(grid_t, grid_h * grid_w, 3, 2, -1)  # (t, cell, C, frame, px)
    blue = patches[:, :, 2].mean(dim=(1, 3)).flatten()  # per sampled frame, in the order the model sees them
    painted = [(67 * k) % 256 for k in batch.clips[0].indices]  # each frame's own blue (and the same moving bar)
    assert blue.argsort().tolist() == np.argsort(painted).tolist()


# -- measures on a video prompt -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", (*FAMILIES, "llava_onevision"))
def test_every_measure_equals_the_reference_on_a_video_prompt(family, clips, family_dirs, tmp_path):
    """Layer, attention and flow (frame units, frames->last, video->question, frame:1->last), and Qwen3-VL's
    DeepStack, on an image and a video in one prompt: every result equal to the reference's re-run (DeepStack's
    every-image-position unit holds the image and video tokens, not the timestamps' text between the frames).
    LLaVA-OneVision: 4 frames, each its own view, the newline closing the video in none of the frame units."""
    loaded = load_model(RunSettings(model=str(family_dirs[family]), prompt="-", device="cpu", dtype="float32"))
    settings = vl_settings(loaded.name, tmp_path, images=[str(PIGGY)], videos=[str(clips["mp4"])],
                           max_frames=4, prompt="What moves?", num_tokens=2, mask_unit="frame",
                           measure="layer,attention,flow" + (",deepstack" if family == "qwen3_vl" else ""),
                           flows=("frames->last", "video->question", "frame:1->last"), window=2,
                           check=100000)
    from dataclasses import replace

    from vl_masking.analysis import analyse_measures
    from vl_masking.api import prepare

    inputs, plan = prepare(loaded, settings)
    analyses = analyse_measures(loaded, inputs, plan, replace(settings), progress=False)
    assert [a.measure.name for a in analyses] == ["layer", "attention", "flow"] + (["deepstack"] * (family == "qwen3_vl"))
    for analysis in analyses:
        check = analysis.metadata["check"]
        assert check["max_error"] < 1e-5, (analysis.measure.name, check)
        assert len(check["checked"]) > 0
        print(f"{family} {analysis.measure.name} on a video prompt: largest error {check['max_error']:.2g}")
    frames = [v for v in inputs.tokens.images if v.video == 0]
    assert [v.name for v in frames] == [f"frame {k}" for k in range(4 if family == "llava_onevision" else 2)]
    if family == "llava_onevision":  # the newline closing the video: its last view's, in no frame unit
        closing = frames[-1].end - 1
        assert inputs.tokens.text[closing] == "<image_newline>" and inputs.tokens.grid_col[closing] == -1
        assert not any(closing in u.positions for u in plan.units(0) if u.kind == "frame")
    layer = analyses[0].table
    assert set(layer.loc[layer.token_type == "vision", "unit"].astype(str)) >= {
        f"video 0 frame {k} ({v.time:.1f} s)" for k, v in enumerate(frames)}


# -- bad input ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-videos")
    (root / "notes.mp4").write_text("not a video")
    with av.open(str(root / "empty.mp4"), "w") as container:  # a header, no frames
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = *CLIP_SIZE, "yuv420p"
        container.start_encoding()
    (root / "no-frames").mkdir()
    mixed = root / "mixed"
    mixed.mkdir()
    Image.fromarray(painted_frame(0)).save(mixed / "a.png")
    (mixed / "b.txt").write_text("a note among the frames")
    return root


@pytest.mark.parametrize("case,args,message", [
    ("unreadable", ["--video", "{root}/notes.mp4"], "not a readable video"),
    ("zero frames", ["--video", "{root}/empty.mp4"], "has no frames"),
    ("empty folder", ["--video", "{root}/no-frames"], "has no frames"),
    ("non-image in folder", ["--video", "{root}/mixed"], "b.txt is not an image"),
    ("missing", ["--video", "{root}/absent.mp4"], "video not found"),
    ("max frames 0", ["--video", "{root}/mixed", "--max-frames", "0"], "--max-frames must be at least 1"),
    ("fps without video", ["--image", str(PIGGY), "--fps", "2"], "--fps needs --video"),
])
def test_a_bad_video_is_one_line_exit_2_and_no_file_before_the_model_loads(case, args, message, bad_videos,
                                                                           tiny_vl_dir, tmp_path, monkeypatch):
    import vl_masking.api

    def no_loading(*_, **__):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(vl_masking.api, "load_model", no_loading)
    out = tmp_path / "out"
    proc = run_cli("mask_impact_vl.py", "--model", str(tiny_vl_dir), "--prompt", "What moves?",
                   *[a.format(root=bad_videos) for a in args], "--output-dir", out)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not out.exists()


def test_a_video_given_to_a_family_without_videos_is_refused_before_the_weights_load(clips, tmp_path):
    from vl_masking.tiny_models import build_llava

    model = build_llava(tmp_path / "llava")
    for weights in model.glob("*.safetensors"):
        weights.write_bytes(b"")  # the refusal must come before the weights are read
    proc = run_cli("mask_impact_vl.py", "--model", model, "--prompt", "What moves?", "--video", clips["mp4"],
                   "--output-dir", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "with videos" in proc.stderr and "Qwen-VL" in proc.stderr and "LLaVA" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# -- viewers ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[("qwen3_vl", ()), ("llava_onevision", ("--max-frames", 3))])
def video_file(request, family_dirs, clips, tmp_path_factory):
    """A layer file on the webm clip, frame units: of the tiny Qwen3-VL (4 frames sampled: 2 temporal patches),
    and of the tiny LLaVA-OneVision (3 frames, each a view; the newline closing the video after the last)."""
    family, options = request.param
    out = tmp_path_factory.mktemp("video-viewer")
    run_cli("mask_impact_vl.py", "--model", family_dirs[family], "--video", clips["webm"], *options, "--prompt",
            "What moves?", "--mask-mode", "both", "--mask-unit", "frame", "--output-dir", out, "--output", "frames",
            "--formats", "parquet", check=True)
    return out / "frames.parquet"


@pytest.mark.browser
def test_the_grid_viewer_shows_a_filmstrip_and_a_frame_by_layer_map_of_the_files_numbers(browser, video_file,
                                                                                        clips):
    from vl_masking.results import read_metadata, read_table

    page = open_viewer(browser, "visualize_vl_grid.html", video_file)
    assert not page.errors
    meta, table = read_metadata(video_file), read_table(video_file)
    views = meta["images"]
    titles = page.eval_on_selector_all(".image-panel h3", "h => h.map(x => x.textContent)")
    assert [t.split(":")[0] for t in titles] == [f"video 0 frame {k} ({round(v['time'], 3):g} s)"
                                                  for k, v in enumerate(views)]
    # the frame x layer map: each cell the file's value of that frame unit at that layer (step 0, Full, L2)
    heads = page.eval_on_selector_all("#frame-map tr:first-child th", "h => h.map(x => x.textContent)")[1:]
    assert heads == [f"video 0 frame {k} ({v['time']:.1f} s)" for k, v in enumerate(views)]
    cells = page.eval_on_selector_all("#frame-map td", "c => c.map(x => [Number(x.dataset.pos), "
                                      "Number(x.dataset.layer), Number(x.dataset.value), x.textContent])")
    shown = table[(table.variant.astype(str) == "Full") & (table.generation_step == 0) &
                  (table.unit_kind.astype(str) == "frame")]
    assert len(cells) == len(shown) == meta["num_layers"] * len(views)
    for position, layer, value, text in cells:
        row = shown[(shown.token_position == position) & (shown.layer == layer)]
        assert value == pytest.approx(float(row.l2_distance.iloc[0]), rel=1e-6), (position, layer)
        assert float(text) == pytest.approx(value, rel=1e-3)  # four significant digits
    # the clip's frames under their temporal patches, decoded by the browser
    page.set_input_files("#image-file", [str(clips["webm"])])
    page.wait_for_selector(f"body[data-pictures='{len(views)}']", state="attached", timeout=10000)
    assert not page.errors
    page.close()


@pytest.mark.browser
def test_the_results_viewer_labels_video_tokens_by_frame_and_time(browser, family_dirs, clips, tmp_path):
    from vl_masking.results import read_metadata

    run_cli("mask_impact_vl.py", "--model", family_dirs["qwen3_vl"], "--video", clips["webm"], "--prompt",
            "What moves?", "--mask-mode", "both", "--output-dir", tmp_path, "--output", "tokens", "--formats",
            "parquet", check=True)
    page = open_viewer(browser, "visualize_results.html", tmp_path / "tokens.parquet")
    assert not page.errors
    text = page.inner_text("body")
    meta = read_metadata(tmp_path / "tokens.parquet")
    for k, view in enumerate(meta["images"]):
        assert f"vid0 frame {k} r0 c0" in text, k
    page.close()


# -- figures ------------------------------------------------------------------------------------------------

def test_a_video_result_gets_a_frame_by_layer_figure_with_its_frames_over_their_columns(family_dirs, clips,
                                                                                       tmp_path):
    """From a flow file with frames->last: the frames x layers map with the clip's frames above it (read again from
    the video the metadata names) and one curve per frame, drawn from the file's numbers."""
    from vl_masking.figures import main
    from vl_masking.figures.drawing import filmstrip, frame_layers, frame_maps, load_picture
    from vl_masking.figures.reading import load, pick

    run_cli("mask_impact_vl.py", "--model", family_dirs["qwen3_vl"], "--video", clips["folder"], "--fps", 24,
            "--max-frames", 6, "--prompt", "What moves?", "--mask-mode", "vision", "--measure", "flow", "--flow",
            "video->question", "--flow", "frames->last", "--window", 1, "--output-dir", tmp_path, "--output", "flow",
            "--formats", "parquet", check=True)
    written = main([str(tmp_path / "flow.parquet"), "--out", str(tmp_path / "figures")], log=lambda *_: None)
    assert str(tmp_path / "figures" / "flow_frames.png") in written
    result = load(tmp_path / "flow.parquet")
    rows = pick(result, 0, "frames->last", "rel_change")
    frames = rows[rows.unit_kind.astype(str) == "frame"]
    assert frames.unit_positions.nunique() == 3  # 6 frames: 3 temporal patches
    strip = filmstrip(result, sorted(frames.image_index.astype(int).unique()))
    expected = [np.asarray(Image.open(clips["folder"] / f"frame{k:03d}.png").convert("RGB")) for k in (0, 2, 5)]
    assert np.array_equal(strip, np.concatenate(expected, axis=1))  # each patch's first frame: 0, 2 and 5
    fig = frame_layers(result, 0, "frames->last", "rel_change")
    heat = [im for ax in fig.axes for im in ax.get_images() if im.get_array().ndim == 2][0].get_array()
    for k, (_, part) in enumerate(frames.sort_values("token_position").groupby("unit_positions", sort=False)):
        assert np.allclose(heat[:, k], part.sort_values("layer").value.to_numpy(), equal_nan=True)

    # a video file (not a folder) under the maps: each view's first frame, decoded again (LLaVA-OneVision's frames)
    run_cli("mask_impact_vl.py", "--model", family_dirs["llava_onevision"], "--video", clips["mp4"], "--max-frames", 3,
            "--prompt", "What moves?", "--mask-mode", "vision", "--mask-unit", "frame", "--output-dir", tmp_path,
            "--output", "frames", "--formats", "parquet", check=True)
    written = main([str(tmp_path / "frames.parquet"), "--out", str(tmp_path / "figures")], log=lambda *_: None)
    assert {str(tmp_path / "figures" / f"frames_{kind}.png") for kind in ("layers", "frames")} <= set(written)
    result = load(tmp_path / "frames.parquet")
    last = result.meta["images"][-1]
    assert np.array_equal(load_picture(result, None, last), filmstrip(result, [last["index"]]))
    assert load_picture(result, None, last).shape == (CLIP_SIZE[1], CLIP_SIZE[0], 3)

    # token units: every frame's map at one layer, each panel's cells the file's values over its own frame
    run_cli("mask_impact_vl.py", "--model", family_dirs["qwen3_vl"], "--video", clips["mp4"], "--max-frames", 4,
            "--prompt", "What moves?", "--mask-mode", "vision", "--output-dir", tmp_path, "--output", "tokens",
            "--formats", "parquet", check=True)
    written = main([str(tmp_path / "tokens.parquet"), "--out", str(tmp_path / "figures")], log=lambda *_: None)
    assert str(tmp_path / "figures" / "tokens_frame_maps.png") in written
    result = load(tmp_path / "tokens.parquet")
    fig = frame_maps(result, 0, "Full", "l2", 1, picture_mode="colour")  # each frame as it is, under the heat
    views = [v for v in result.meta["images"] if v.get("video") == 0]
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [f"{v['view']} ({v['time']:.1f} s)" for v in views]
    rows = pick(result, 0, "Full", "l2")
    for ax, view in zip(panels, views):
        under, heat = [im.get_array() for im in ax.get_images()][:2]
        assert np.array_equal(np.asarray(under)[..., :3], load_picture(result, None, view))  # the panel's own frame
        mine = rows[(rows.layer == 1) & (rows.image_index == view["index"])]
        expected = np.full((view["grid_rows"], view["grid_cols"]), np.nan)
        expected[mine.grid_row.astype(int), mine.grid_col.astype(int)] = mine.value
        assert np.allclose(np.asarray(heat), expected, equal_nan=True)


def test_a_study_reads_a_video_column_and_checks_every_row(family_dirs, clips, tmp_path):
    """--dataset with --columns video=COL: each row's video (a file, a folder of frames), analysed and checked."""
    import json

    from vl_masking.study import read_study

    table = tmp_path / "clips.jsonl"
    rows = [{"id": "mp4", "clip": str(clips["mp4"]), "q": "What moves?"},
            {"id": "folder", "clip": str(clips["folder"]), "q": "What colour is it?"}]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_cli("mask_impact_vl.py", "--model", family_dirs["qwen3_vl"], "--dataset", table, "--columns",
            "id=id,video=clip,question=q", "--mask-mode", "vision", "--mask-unit", "frame", "--check", 4,
            "--output-dir", tmp_path / "out", "--output", "study", check=True)
    rows = read_study(tmp_path / "out" / "study")
    assert set(rows.example_id.astype(str)) == {"mp4", "folder"}
    assert set(rows.unit_kind.astype(str)) == {"frame"}


def test_a_batch_config_takes_videos_and_resume_reruns_a_prompt_whose_video_changed(family_dirs, clips, tmp_path):
    """--config with `video:` and `videos:` (paths relative to the file): every prompt done with its frames, and
    a video file rewritten between the runs makes --resume run that prompt again, and only it."""
    import json
    import shutil

    import yaml

    from vl_masking.results import read_metadata

    shutil.copy(clips["mp4"], tmp_path / "clip.mp4")
    shutil.copytree(clips["folder"], tmp_path / "frames")
    config = tmp_path / "batch.yaml"
    config.write_text(yaml.safe_dump({
        "defaults": {"model": str(family_dirs["qwen3_vl"]), "mask_mode": "vision", "mask_unit": "frame",
                     "num_tokens": 1, "max_frames": 4, "device": "cpu", "output_dir": "out", "formats": "parquet"},
        "prompts": [{"name": "file", "video": "clip.mp4", "prompt": "What moves?"},
                    {"name": "folder", "videos": ["frames"], "prompt": "What colour is it?"}]}))
    run_cli("mask_impact_vl.py", "--config", config, check=True)
    manifest = lambda: {e["name"]: e for e in json.loads((tmp_path / "out" / "batch.batch.json").read_text())["prompts"]}  # noqa: E731
    first = manifest()
    assert [e["status"] for e in first.values()] == ["done", "done"]
    for name, source in (("file", tmp_path / "clip.mp4"), ("folder", tmp_path / "frames")):
        videos = read_metadata(tmp_path / "out" / f"{name}.parquet")["videos"]
        assert [v["path"] for v in videos] == [str(source)] and len(videos[0]["frames"]) == 4
    write_clip(tmp_path / "clip.mp4", "libx264", 5, 4)  # another video under the same name
    proc = run_cli("mask_impact_vl.py", "--config", config, "--resume", check=True)
    assert "1 prompt(s) already done, 1 to run" in proc.stdout, proc.stdout
    second = manifest()
    assert second["folder"] == first["folder"] and second["file"]["settings_hash"] != first["file"]["settings_hash"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tower_measures_on_a_video_equal_the_reference_and_no_frame_reaches_another(family, clips, family_dirs,
                                                                                       tmp_path):
    """encoder and encoder-flow on a video prompt (2 temporal patches), frame units: every block's rows and 16
    encoder-flow configurations equal the reference (and Qwen3-VL's DeepStack rows, on a prompt of a video alone). Qwen's tower attends within each temporal patch, so a frame
    hidden in a block moves its own frame's queries and leaves the other frame's exactly as they were."""
    from vl_masking.api import run

    settings = vl_settings(family_dirs[family], tmp_path, images=[], videos=[str(clips["mp4"])], max_frames=4,
                           prompt="What moves?", num_tokens=1, mask_unit="frame", mask_mode="vision",
                           measure="encoder,encoder-flow" + (",deepstack" if family == "qwen3_vl" else ""),
                           encoder_window=1, check=16)
    result = run(settings, save=False, progress=False, log=lambda *a: None)
    encoder, flow = result.analyses[:2]
    for analysis in result.analyses:
        check = analysis.metadata["check"]
        assert len(check["checked"]) > 0 and check["max_error"] < 1e-5, (analysis.measure.name, check)
        print(f"{family} {analysis.measure.name} on a video: largest error {check['max_error']:.2g}")
    table = encoder.table
    units = sorted(set(table.unit.astype(str)))
    assert [u.split(" (")[0] for u in units] == ["video 0 frame 0", "video 0 frame 1"], units
    full = table[table.variant.astype(str) == "Full"]
    outside = table[table.variant.astype(str) == "Full outside"]
    assert (full.l2_distance > 0).all() and (outside.l2_distance == 0).all()
    assert set(flow.table.flow.astype(str)) == {"knockout", "mean after projector", "zero after projector"}


def test_the_tower_measures_refuse_images_and_videos_in_one_prompt_before_the_weights_load(family_dirs, clips,
                                                                                          tmp_path, monkeypatch):
    """The model runs its tower once on the images and once on the videos; the encoder measures take one pass."""
    import vl_masking.api

    def no_weights(*_, **__):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(vl_masking.api, "load_weights", no_weights)
    for measure in ("encoder", "encoder-flow"):
        proc = run_cli("mask_impact_vl.py", "--model", family_dirs["qwen3_vl"], "--image", PIGGY, "--video",
                       clips["mp4"], "--prompt", "What moves?", "--mask-mode", "vision", "--measure", measure,
                       "--output-dir", tmp_path / "out")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "give the --image or the --video" in proc.stderr
    assert not (tmp_path / "out").exists()
