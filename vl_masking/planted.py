"""Planted evidence: small vision-language models trained here, on pictures whose evidence we drew, so that a
map can be checked against where the model really has to look.

    python -m vl_masking.planted train .cache/planted-qwen3_vl --family qwen3_vl     # Qwen3-VL, DeepStack on
    python -m vl_masking.planted train .cache/planted-llava --family llava           # LLaVA-1.5: CLIP, CLS dropped
    python -m vl_masking.planted pictures held_out/ --family qwen3_vl --count 40 --seed 1
    python -m vl_masking.planted clips held_out_clips/ --count 24 --seed 1              # Qwen3-VL: videos
    python -m vl_masking.planted train-clips .cache/planted-qwen3_vl .cache/planted-qwen3_vl-clips
    python -m vl_masking.planted look held_out/pictures.jsonl picture0000-square output/planted.*.parquet

The task. A 128 x 128 picture is a 4 x 4 grid of 32-pixel cells (the language model's token grid for both
families: Qwen3-VL's 16-pixel patches merged 2 x 2, LLaVA's 32-pixel CLIP patches) on a textured background.
A square may sit in one cell and a circle in another, each in a colour of its own vocabulary (the square's red,
green, blue, yellow; the circle's orange, pink, cyan, purple: one answer vocabulary per object, which a small
model learns at once, where colours shared by both objects did not learn), and a white or black triangle, a
distractor of another shape and colour, sits in a third cell of every picture. The questions are "What color is
the square?" and "What color is the circle?", answered by one token; an object that is not in the picture is
answered "none", so that no colour is a default the model could answer without looking (a model that saw every
other square colour answered "blue" by elimination). The evidence of a question is the asked object's cell.

The models are the real architectures at toy widths, with the family's own image processor, a chat template and
a byte-level BPE tokenizer trained on the prompts (a 152k-token vocabulary would dwarf such a model), saved with
save_pretrained and loaded through --model like any checkpoint. Training is seeded and runs on 2 CPU cores in
about a minute; the pixel values are made for a whole batch at once, equal to the processor's (checked).
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZE, CELL, GRID = 128, 32, 4  # pixels a side, pixels a cell, cells a side
SQUARE = {"red": (215, 35, 35), "green": (35, 160, 55), "blue": (40, 75, 215), "yellow": (235, 205, 30)}
CIRCLE = {"orange": (240, 135, 20), "pink": (245, 120, 185), "cyan": (30, 200, 215), "purple": (130, 50, 180)}
OBJECTS = {"square": SQUARE, "circle": CIRCLE}
NONE = "none"
DISTRACTOR = ((245, 245, 245), (20, 20, 20))  # a white or black triangle: no answer's colour
QUESTIONS = {name: f"What color is the {name}?" for name in OBJECTS}
ANSWERS = (*SQUARE, *CIRCLE, NONE)
PRESENT = 0.8  # the chance that each object is in a picture (both absent: drawn again)
FAMILIES = ("qwen3_vl", "llava")
SPECIALS = {"qwen3_vl": ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                         "<|image_pad|>", "<|video_pad|>"),
            "llava": ("<|endoftext|>", "<|im_end|>", "<image>")}
# Per family: AdamW steps of BATCH pictures (each asked both questions) and the peak learning rate of a one-cycle
# schedule (at 3e-3 both learned in some runs and stayed near 50% in others; 1e-3 learned in every run tried).
TRAINING = {"qwen3_vl": {"steps": 700, "lr": 1e-3}, "llava": {"steps": 1600, "lr": 1e-3}}
BATCH, SEED = 32, 0
# Clips (Qwen3-VL, which takes videos): CLIP_FRAMES frames, two per temporal patch (a picture held for both), the
# asked object in one temporal patch only. The model trained on pictures answers "none" for most clips whose object
# is not in the first patch (6 of 24 answered); its video variant is that model trained on clips for CLIP_STEPS more.
CLIP_FRAMES, MOST_FRAMES, CLIP_FPS = 8, 16, 24.0  # a folder of frames: the processor's 24 frames per second
CLIP_STEPS, CLIP_BATCH = 30, 8  # 20 steps already answered 95% of held-out clips


# -- pictures -------------------------------------------------------------------------------------

@dataclass
class Picture:
    pixels: np.ndarray  # (SIZE, SIZE, 3) uint8
    cells: dict  # object -> (row, col) of its cell; absent objects are missing
    colours: dict  # object -> its colour's name

    def answer(self, name: str) -> str:
        return self.colours.get(name, NONE)

    def evidence(self, name: str) -> list:
        """The asked object's cells in the language model's token grid ([] when it is absent)."""
        return [list(self.cells[name])] if name in self.cells else []


def draw(rng: np.random.Generator) -> Picture:
    """One picture: a textured background (grey-brown noise and stripes, none of the answers' hues), a square and a
    circle in distinct random cells, each present with probability PRESENT."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    base = rng.uniform(90, 150)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 18)
    stripes = 18 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    noise = rng.normal(0, 12, (SIZE, SIZE))
    grey = base + stripes + noise
    tint = rng.uniform(0.85, 1.0, 3) * np.array([1.0, 0.95, 0.85])  # greys to browns
    pixels = np.clip(grey[..., None] * tint, 0, 255)
    while True:
        present = [name for name in OBJECTS if rng.random() < PRESENT]
        if present:
            break
    cells = rng.choice(GRID * GRID, size=len(present) + 1, replace=False)
    where, colours = {}, {}
    row, col = divmod(int(cells[-1]), GRID)  # a distractor of another shape and colour in a cell of its own, always
    cy, cx, half = row * CELL + CELL / 2, col * CELL + CELL / 2, rng.uniform(8, 11)
    triangle = (yy >= cy - half) & (yy <= cy + half) & (np.abs(xx - cx) <= (yy - (cy - half)) / 2)
    pixels[triangle] = DISTRACTOR[rng.integers(len(DISTRACTOR))]
    for name, cell in zip(present, cells):
        row, col = divmod(int(cell), GRID)
        colour = list(OBJECTS[name])[rng.integers(len(OBJECTS[name]))]
        cy, cx = row * CELL + CELL / 2 + rng.uniform(-3, 3), col * CELL + CELL / 2 + rng.uniform(-3, 3)
        half = rng.uniform(8, 11)
        if name == "square":
            inside = (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
        else:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= (half + 1) ** 2
        pixels[inside] = OBJECTS[name][colour]
        where[name], colours[name] = (row, col), colour
    return Picture(pixels.astype(np.uint8), where, colours)


def examples(rng, count: int) -> list:
    """[(picture, question's object)], every picture asked both questions."""
    out = []
    for _ in range(count):
        picture = draw(rng)
        out += [(picture, name) for name in OBJECTS]
    return out


# -- the checkpoint: tokenizer, processor, config ----------------------------------------------------

def prompt_texts(family: str) -> dict:
    """The prompt of each question as the checkpoint's chat template writes it (the image placeholder once)."""
    if family == "qwen3_vl":
        return {name: f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n"
                      f"<|im_start|>assistant\n" for name, q in QUESTIONS.items()}
    return {name: f"USER: <image>\n{q} ASSISTANT:" for name, q in QUESTIONS.items()}


def build_tokenizer(family: str, out: Path):
    """A byte-level BPE tokenizer trained on the prompts and answers (every word one token), with the family's
    special tokens under their real names, and the family's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .tiny_models import LLAVA_CHAT_TEMPLATE, VL_CHAT_TEMPLATE

    specials = list(SPECIALS[family])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = []
    for text in prompt_texts(family).values():
        for answer in ANSWERS:
            corpus += [text + answer, text + " " + answer] * 20
    corpus += ["user assistant system USER ASSISTANT Describe this image. What is in the picture?"] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    pieces = [piece for text in corpus for piece in _split_specials(text, specials)]
    tokenizer.train_from_iterator(pieces, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      additional_special_tokens=[s for s in specials if s not in ("<|im_end|>",
                                                                                                  "<|endoftext|>")])
    wrapped.chat_template = VL_CHAT_TEMPLATE.read_text(encoding="utf-8") if family == "qwen3_vl" \
        else LLAVA_CHAT_TEMPLATE
    wrapped.save_pretrained(out)
    for answer in ANSWERS:  # one token each, as the question's answer follows the prompt
        for text in (answer, " " + answer):
            if len(wrapped.encode(text, add_special_tokens=False)) != 1:
                raise RuntimeError(f"the tokenizer splits the answer {text!r}")
    return wrapped


def _split_specials(text: str, specials: list) -> list:
    """The text without its special tokens (the trainer learns merges of the words between them)."""
    for special in specials:
        text = text.replace(special, "\0")
    return [part for part in text.split("\0") if part]


def build_config(family: str, tokenizer):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS[family]}
    vocab = len(tokenizer)
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        head_dim = 16
        half = head_dim // 2
        text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=4096,
                    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "mrope_section": [half - 2 * (half * 3 // 8), half * 3 // 8,
                                                                           half * 3 // 8],
                                                         "mrope_interleaved": True},
                    eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"],
                    pad_token_id=ids["<|endoftext|>"])
        vision = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
        return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                             video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                             vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                       eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"],
                       pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                              image_size=SIZE, patch_size=CELL, projection_dim=64)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                       vision_feature_select_strategy="default", vision_feature_layer=-2,
                       image_seq_length=GRID * GRID, tie_word_embeddings=False)


def processor_config(family: str) -> dict:
    from .tiny_models import clip_processor_config, image_processor_config

    if family == "qwen3_vl":
        return image_processor_config(min_pixels=SIZE * SIZE, max_pixels=SIZE * SIZE)
    return clip_processor_config(SIZE)


def video_processor_config() -> dict:
    """Qwen3-VL's video processor, with a pixel budget that keeps SIZE x SIZE frames at their size for clips of 2
    to MOST_FRAMES frames (the budget counts frames), and the image processor's normalisation."""
    image = processor_config("qwen3_vl")
    return {"video_processor_type": "Qwen3VLVideoProcessor", "size": {"shortest_edge": 2 * SIZE * SIZE,
                                                                       "longest_edge": MOST_FRAMES * SIZE * SIZE},
            **{key: image[key] for key in ("image_mean", "image_std", "patch_size", "temporal_patch_size",
                                           "merge_size", "do_resize", "do_rescale", "do_normalize", "rescale_factor")},
            "do_sample_frames": True, "fps": 2, "min_frames": 4, "max_frames": MOST_FRAMES}


def pixel_values(family: str, pictures: list, config: dict):
    """The family's pixel values of a batch of SIZE x SIZE pictures, as its image processor makes them (no
    resize is needed at this size): Qwen3-VL's patches in merge-block order, 2 frames a patch; CLIP's normalised
    image."""
    import torch

    x = torch.from_numpy(np.stack([p.pixels for p in pictures])).float() / 255.0  # (B, H, W, C)
    mean, std = torch.tensor(config["image_mean"]), torch.tensor(config["image_std"])
    x = ((x - mean) / std).permute(0, 3, 1, 2)  # (B, C, H, W)
    if family != "qwen3_vl":
        return {"pixel_values": x}
    b, c, p, t, m = len(pictures), 3, config["patch_size"], config["temporal_patch_size"], config["merge_size"]
    g = SIZE // p
    x = x[:, None].expand(b, t, c, SIZE, SIZE)  # one picture = t identical frames
    x = x.reshape(b, t, c, g // m, m, p, g // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (B, gh/m, gw/m, m, m, C, t, p, p): merge blocks together
    patches = x.reshape(b * g * g, c * t * p * p)
    grid = torch.tensor([[1, g, g]] * b)
    return {"pixel_values": patches, "image_grid_thw": grid}


# -- training -------------------------------------------------------------------------------------

def train(out, family: str = "qwen3_vl", steps: int | None = None, seed: int = SEED, log=print) -> dict:
    """Train a planted-evidence model into `out`; returns what the training measured (written to
    `out/planted.json`)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from .inputs import quiet_transformers

    if family not in FAMILIES:
        raise ValueError(f"--family {family}: one of {', '.join(FAMILIES)}")
    quiet_transformers()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps, lr = steps or TRAINING[family]["steps"], TRAINING[family]["lr"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float sums, so the same model, however many cores there are
    try:
        return _train(out, family, steps, lr, seed, log)
    finally:
        torch.set_num_threads(threads)


def _train(out: Path, family: str, steps: int, lr: float, seed: int, log) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    started = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(family, out)
    config = build_config(family, tokenizer)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, eos[1]
    processing = processor_config(family)
    (out / "preprocessor_config.json").write_text(json.dumps(processing, indent=2))
    if family == "qwen3_vl":
        (out / "video_preprocessor_config.json").write_text(json.dumps(video_processor_config(), indent=2))
    model.save_pretrained(out)  # the config first: the tool's own prompt building reads the directory
    prompts, answer_ids = tool_prompts(out, family)
    check_pixels(out, family, processing)
    rng = np.random.default_rng(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)

    def loss_of_step():
        batch = [draw(rng) for _ in range(BATCH // 2)]
        loss = 0.0
        for name in OBJECTS:  # one forward per question: every prompt of it has the same length
            hidden = hide_evidence(family, batch, name, rng)
            logits = forward(model, family, prompts[name], batch, processing, hidden)
            target = torch.tensor([answer_ids[NONE if hide else p.answer(name)] for p, hide in zip(batch, hidden)])
            loss = loss + torch.nn.functional.cross_entropy(logits, target) / len(OBJECTS)
        return loss

    losses = optimise(model, optimiser, schedule, steps, loss_of_step, log, "step")
    model.save_pretrained(out)
    measured = {"family": family, "steps": steps, "lr": lr, "batch": BATCH, "seed": seed, "train_seconds": round(
        time.perf_counter() - started, 1), "final_loss": round(float(np.mean(losses[-50:])), 5),
        "accuracy": accuracy(model, family, prompts, answer_ids, processing, np.random.default_rng(seed + 10_000))}
    (out / "planted.json").write_text(json.dumps(measured, indent=2))
    log(f"trained {family} in {measured['train_seconds']} s; held-out accuracy {measured['accuracy']}")
    return measured


def optimise(model, optimiser, schedule, steps: int, loss_of_step, log, label: str) -> list:
    """`steps` steps of the optimiser (and its schedule) on loss_of_step(); the model left in eval mode; the losses."""
    model.train()
    losses = []
    for step in range(steps):
        loss = loss_of_step()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if schedule is not None:
            schedule.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"{label} {step + 1}/{steps}: loss {np.mean(losses[-50:]):.4f}")
    model.eval()
    return losses


def tool_prompts(out: Path, family: str) -> tuple:
    """({object: input ids of its question (1, S)}, {answer: token id}), as the tool builds the prompt of that
    question for a picture (the same chat template, image tokens and answer tokenization as an analysis)."""
    from PIL import Image

    from .targets import target_token
    from .inputs import build_inputs, load_model
    from .options import RunSettings

    import tempfile

    probe = tempfile.TemporaryDirectory(prefix="planted-probe-")  # its own per process: two may ask at once
    picture = Path(probe.name) / "probe.png"
    Image.fromarray(draw(np.random.default_rng(0)).pixels).save(picture)
    try:
        loaded = load_model(RunSettings(model=str(out), prompt="-", device="cpu", dtype="float32"), weights=False)
        prompts, answers = {}, {}
        for name, question in QUESTIONS.items():
            inputs = build_inputs(loaded, RunSettings(model=str(out), prompt=question, images=[str(picture)],
                                                      device="cpu", dtype="float32"))
            prompts[name] = inputs.input_ids
            for answer in ANSWERS:
                answers[answer] = target_token(loaded.tokenizer, f'text:"{answer}"', inputs.input_ids[0])
    finally:
        probe.cleanup()
    return prompts, answers


def check_pixels(out: Path, family: str, processing: dict) -> None:
    """The batch-made pixel values equal the family's image processor's for a few pictures."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(out)
    pictures = [draw(np.random.default_rng(k)) for k in range(3)]
    ours = pixel_values(family, pictures, processing)
    theirs = processor(images=[Image.fromarray(p.pixels) for p in pictures], return_tensors="pt")
    for key, value in ours.items():
        if not torch.allclose(value.float(), theirs[key].float(), atol=1e-5):
            raise RuntimeError(f"{family}: the batch pixel values differ from the image processor's ({key})")


HIDDEN = {"qwen3_vl": 0.0, "llava": 0.25}  # the share of training questions whose evidence token is hidden


def hide_evidence(family: str, pictures: list, name: str, rng) -> list:
    """Per picture: the index (in the 4 x 4 grid) of the asked object's token to hide from the language model's
    attention, or None. A question whose evidence is hidden is answered "none": the model learns that the answer
    is in that token and nowhere else. Without it the LLaVA model, whose CLIP blocks spread "a circle is here"
    over other patches, answered the one circle colour it could name by elimination (cyan) with the circle's
    own token hidden (the shortcut a probe of an earlier version found for "blue"); the Qwen3-VL model needs no such help
    (and its M-RoPE positions follow the attention mask, so a hidden token would move every later position)."""
    out = []
    for picture in pictures:
        cell = picture.cells.get(name)
        out.append(cell[0] * GRID + cell[1] if cell is not None and rng.random() < HIDDEN[family] else None)
    return out


def forward(model, family: str, prompt, pictures: list, processing: dict, hidden=None):
    """The next-token logits at the last position of each picture's prompt (B, V); hidden: per picture the image
    token (index in the grid) no position may attend to, or None."""
    import torch

    ids = prompt.expand(len(pictures), -1)
    mask = torch.ones_like(ids)
    if hidden is not None and any(h is not None for h in hidden):
        image_positions = (prompt[0] == model.config.image_token_id).nonzero().flatten()
        mask = mask.clone()
        for k, h in enumerate(hidden):
            if h is not None:
                mask[k, image_positions[h]] = 0
    kwargs = {"input_ids": ids, "attention_mask": mask, **pixel_values(family, pictures, processing)}
    if family == "qwen3_vl":
        kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
    return model(**kwargs, logits_to_keep=1).logits[:, -1].float()


def accuracy(model, family: str, prompts: dict, answer_ids: dict, processing: dict, rng, count: int = 200) -> dict:
    """Greedy first-token accuracy per question on `count` held-out pictures."""
    import torch

    pictures = [draw(rng) for _ in range(count)]
    out = {}
    with torch.no_grad():
        for name in OBJECTS:
            predicted = forward(model, family, prompts[name], pictures, processing).argmax(-1).tolist()
            right = [predicted[k] == answer_ids[p.answer(name)] for k, p in enumerate(pictures)]
            out[name] = round(sum(right) / len(right), 4)
    return out


# -- held-out pictures ------------------------------------------------------------------------------

def write_pictures(out_dir, family: str, count: int, seed: int) -> Path:
    """`count` held-out pictures (PNG) and OUT_DIR/pictures.jsonl: one line per (picture, question) with the
    answer and the evidence's cells in the language model's token grid (the rows and columns of grid_row and
    grid_col in the result files; the same 4 x 4 grid for both families)."""
    from PIL import Image

    if family not in FAMILIES:
        raise ValueError(f"--family {family}: one of {', '.join(FAMILIES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1_000_000)  # never a training picture's stream
    lines = []
    for k in range(count):
        picture = draw(rng)
        name = f"picture{k:04d}.png"
        Image.fromarray(picture.pixels).save(out_dir / name)
        for obj, question in QUESTIONS.items():
            cell = picture.cells.get(obj, (-1, -1))
            lines.append({"id": f"picture{k:04d}-{obj}", "image": name, "question": question, "object": obj,
                          "answer": picture.answer(obj), "evidence": picture.evidence(obj),
                          "evidence_row": cell[0], "evidence_col": cell[1],
                          "other": next(o for o in OBJECTS if o != obj),
                          "other_evidence": picture.evidence(next(o for o in OBJECTS if o != obj))})
    path = out_dir / "pictures.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def draw_clip(rng, name: str) -> tuple:
    """(CLIP_FRAMES // 2 pictures, one per temporal patch, the object `name` in exactly one of them; that patch)."""
    patches = CLIP_FRAMES // 2
    evidence = int(rng.integers(patches))
    pictures = []
    for j in range(patches):
        picture = draw(rng)
        while (name in picture.cells) != (j == evidence):
            picture = draw(rng)
        pictures.append(picture)
    return pictures, evidence


def save_clip(folder: Path, pictures: list) -> None:
    """A clip as a folder of frames: each picture held for the two frames of its temporal patch."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for j, picture in enumerate(pictures):
        for frame in (2 * j, 2 * j + 1):
            Image.fromarray(picture.pixels).save(folder / f"frame{frame:03d}.png")


def clip_prompts(out: Path) -> tuple:
    """({object: input ids of its question about a clip (1, S)}, their mm_token_type_ids), as the tool builds the
    prompt of a clip of CLIP_FRAMES frames (a folder, sampled at CLIP_FPS: every frame)."""
    import shutil
    import tempfile

    from .inputs import build_inputs, load_model
    from .options import RunSettings

    folder = Path(tempfile.mkdtemp(prefix="planted-clip-"))
    save_clip(folder, draw_clip(np.random.default_rng(0), "square")[0])
    try:
        loaded = load_model(RunSettings(model=str(out), prompt="-", device="cpu", dtype="float32"), weights=False)
        prompts, types = {}, {}
        for name, question in QUESTIONS.items():
            inputs = build_inputs(loaded, RunSettings(model=str(out), prompt=question, videos=[str(folder)],
                                                      fps=CLIP_FPS, max_frames=CLIP_FRAMES, device="cpu",
                                                      dtype="float32"))
            prompts[name], types[name] = inputs.input_ids, inputs.model_kwargs["mm_token_type_ids"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return prompts, types


def forward_clips(model, prompt, types, clips: list, processing: dict):
    """The next-token logits at the last position of each clip's prompt (B, V): a clip's temporal patches are its
    pictures' patches one after the other (a picture held for two frames is one temporal patch)."""
    import torch

    pictures = [picture for clip in clips for picture in clip]
    values = pixel_values("qwen3_vl", pictures, processing)["pixel_values"]
    grid = SIZE // processing["patch_size"]
    ids = prompt.expand(len(clips), -1)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types.expand(len(clips), -1),
              "pixel_values_videos": values, "video_grid_thw": torch.tensor([[len(clips[0]), grid, grid]] * len(clips))}
    return model(**kwargs, logits_to_keep=1).logits[:, -1].float()


def train_clips(image_model, out, steps: int = CLIP_STEPS, seed: int = SEED, log=print) -> dict:
    """The planted Qwen3-VL model (`image_model`, trained on pictures) trained CLIP_STEPS more on clips, both
    questions, the asked object in one temporal patch; saved to `out` with its held-out accuracy on clips."""
    import shutil

    import torch
    from transformers import AutoModelForImageTextToText

    started = time.perf_counter()
    out = Path(out)
    shutil.copytree(image_model, out, dirs_exist_ok=True)
    (out / "planted.json").unlink(missing_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    processing = processor_config("qwen3_vl")
    prompts, types = clip_prompts(out)
    _, answer_ids = tool_prompts(out, "qwen3_vl")
    rng = np.random.default_rng(seed + 3_000_000)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)

    def loss_of_step():
        loss = 0.0
        for name in OBJECTS:
            clips = [draw_clip(rng, name)[0] for _ in range(CLIP_BATCH)]
            logits = forward_clips(model, prompts[name], types[name], clips, processing)
            target = torch.tensor([answer_ids[next(p for p in clip if name in p.cells).answer(name)] for clip in clips])
            loss = loss + torch.nn.functional.cross_entropy(logits, target) / len(OBJECTS)
        return loss

    losses = optimise(model, optimiser, None, steps, loss_of_step, log, "clips step")
    model.save_pretrained(out)
    held_out = np.random.default_rng(seed + 4_000_000)
    right = {}
    with torch.no_grad():
        for name in OBJECTS:
            clips = [draw_clip(held_out, name)[0] for _ in range(64)]
            predicted = forward_clips(model, prompts[name], types[name], clips, processing).argmax(-1).tolist()
            right[name] = round(float(np.mean([p == answer_ids[next(x for x in clip if name in x.cells).answer(name)]
                                               for p, clip in zip(predicted, clips)])), 4)
    measured = {"family": "qwen3_vl", "trained_on": "clips", "from": str(image_model), "steps": steps,
                "batch": CLIP_BATCH, "seed": seed, "train_seconds": round(time.perf_counter() - started, 1),
                "final_loss": round(float(np.mean(losses[-50:])), 5), "accuracy": right}
    (out / "planted.json").write_text(json.dumps(measured, indent=2))
    log(f"trained on clips in {measured['train_seconds']} s; held-out accuracy {right}")
    return measured


def write_clips(out_dir, count: int, seed: int) -> Path:
    """`count` held-out clips, each a folder of CLIP_FRAMES frames (PNG, two per temporal patch), and
    OUT_DIR/clips.jsonl: per clip the square's question, its answer and the temporal patch that shows the square
    (evidence_frame); the other patches show pictures without a square (a circle, the triangle)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 2_000_000)  # neither a training nor a held-out picture's stream
    lines = []
    for k in range(count):
        pictures, evidence = draw_clip(rng, "square")
        folder = out_dir / f"clip{k:04d}"
        save_clip(folder, pictures)
        lines.append({"id": f"clip{k:04d}", "video": folder.name, "question": QUESTIONS["square"], "object": "square",
                      "answer": pictures[evidence].answer("square"), "evidence_frame": evidence,
                      "frames": CLIP_FRAMES})
    path = out_dir / "clips.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["look"]:
        return look_command(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m vl_masking.planted", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    trainer = commands.add_parser("train", help="train a planted-evidence model into DIR")
    trainer.add_argument("dir")
    trainer.add_argument("--family", choices=FAMILIES, default="qwen3_vl")
    trainer.add_argument("--steps", type=int, default=None, help="default: the family's (TRAINING)")
    trainer.add_argument("--seed", type=int, default=SEED)
    drawer = commands.add_parser("pictures", help="draw held-out pictures and OUT_DIR/pictures.jsonl")
    drawer.add_argument("out_dir")
    drawer.add_argument("--family", choices=FAMILIES, default="qwen3_vl")
    drawer.add_argument("--count", type=int, default=40)
    drawer.add_argument("--seed", type=int, default=1)
    clipper = commands.add_parser("train-clips", help="train the planted Qwen3-VL model in IMAGE_MODEL on clips into DIR")
    clipper.add_argument("image_model")
    clipper.add_argument("dir")
    filmer = commands.add_parser("clips", help="draw held-out clips (Qwen3-VL) and OUT_DIR/clips.jsonl")
    filmer.add_argument("out_dir")
    filmer.add_argument("--count", type=int, default=24)
    filmer.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args.dir, args.family, args.steps, args.seed)
    elif args.command == "train-clips":
        train_clips(args.image_model, args.dir)
    elif args.command == "clips":
        path = write_clips(args.out_dir, args.count, args.seed)
        print(f"{args.count} clips of {CLIP_FRAMES} frames: {path}", file=sys.stderr)
    else:
        path = write_pictures(args.out_dir, args.family, args.count, args.seed)
        print(f"{args.count} pictures, {2 * args.count} questions: {path}", file=sys.stderr)




# -- reading results against the evidence ------------------------------------------------------------

def image_token_id(model_dir) -> int:
    """The image token of a planted checkpoint (either family's config)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("image_token_id", config.get("image_token_index"))


def read_lines(path) -> dict:
    """pictures.jsonl -> {id: line}."""
    return {line["id"]: line for line in map(json.loads, Path(path).read_text().splitlines()) if line}


def cells_ranked(rows, value: str, largest: bool = True):
    """Per (example, layer): the image cells (grid_row, grid_col) ordered by `value`, largest first (or the most
    negative first for a change, largest=False); rows of one flow or variant, image units only."""
    image = rows[(rows.token_type.astype(str) == "vision") & (rows.grid_row >= 0)]
    ordered = image.sort_values(value, ascending=not largest, kind="stable")
    return {key: list(zip(part.grid_row.astype(int), part.grid_col.astype(int)))
            for key, part in ordered.groupby(["example_id", "layer"], sort=False, observed=True)}


def flow_localisation(rows, lines: dict) -> list:
    """Per example whose asked object is in the picture: the window with the largest drop of the answer's
    probability when one cell is blocked from the last position, the cell that drops it most there, and whether
    that cell is the evidence's; rows: a flow study's units->last rows."""
    rows = rows[rows.example_id.astype(str).isin([k for k, v in lines.items() if v["evidence"]])]
    ranked = cells_ranked(rows, "rel_change_pct", largest=False)
    out = []
    for example, part in rows.groupby(rows.example_id.astype(str), sort=True):
        image = part[part.token_type.astype(str) == "vision"]
        drops = image.groupby("layer").rel_change_pct.min()
        window = int(drops.idxmin())
        order = ranked[(example, window)]
        evidence = [tuple(c) for c in lines[example]["evidence"]]
        rank = min(order.index(c) for c in evidence) + 1
        out.append({"example": example, "object": lines[example]["object"], "window": window,
                    "drop_pct": round(float(drops.min()), 2), "top_cell": list(order[0]),
                    "evidence": [list(c) for c in evidence], "rank": rank, "hit": rank == 1})
    return out


def evidence_rank(rows, lines: dict, value: str, layers) -> list:
    """Per example (object present) and layer in `layers`: the evidence cell's rank among the image cells by
    `value` (largest first): the layer measure's distance, the attention measure's weight."""
    rows = rows[rows.example_id.astype(str).isin([k for k, v in lines.items() if v["evidence"]])]
    ranked = cells_ranked(rows[rows.layer.isin(list(layers))], value, largest=True)
    out = []
    for (example, layer), order in sorted(ranked.items()):
        evidence = [tuple(c) for c in lines[str(example)]["evidence"]]
        out.append({"example": str(example), "layer": int(layer),
                    "rank": min(order.index(c) for c in evidence) + 1})
    return out


def look(files: list, line: dict) -> list:
    """What to look at in one analysed held-out picture: the evidence's cell and the cell each measure ranks first
    (flow: the largest drop in its best window; the layer measure: the largest Full distance, and the attention
    measure: the largest mean weight, both at the layer flow found; inside the tower: encoder-flow's largest drop
    after the projector and in a vision block, the encoder measure's first cell per block, DeepStack's largest
    drop)."""
    import pandas as pd

    from .results import read_metadata

    tables = {read_metadata(f)["measure"]: pd.read_parquet(f).assign(example_id=line["id"]) for f in files}
    lines = {line["id"]: line}
    out = [f"{line['id']}: {line['question']} -> {line['answer']}; the evidence is cell {line['evidence']} "
           "(row, col of the 4 x 4 grid; outlined in green in the figures)"]
    if not line["evidence"]:
        return out + ["  the asked object is not in this picture: no cell to find"]
    window = None
    if "flow" in tables:
        flow = tables["flow"]
        found = flow_localisation(flow[flow.flow.astype(str) == "units->last"], lines)[0]
        window = found["window"]
        out.append(f"  flow (units->last): the largest drop, {found['drop_pct']}%, in the window centred on layer "
                   f"{window}, at cell {found['top_cell']}")
    for measure, series, value, what in (("layer", "Full", "l2_distance", "moves the layer's update most"),
                                         ("attention", "Mean", "attention", "has the most attention")):
        if measure in tables and window is not None:
            rows = tables[measure][tables[measure].variant.astype(str) == series]
            order = cells_ranked(rows[rows.layer == window], value)[(line["id"], window)]
            out.append(f"  {measure} measure at layer {window}: cell {list(order[0])} {what}")
    if "encoder-flow" in tables:
        rows = tables["encoder-flow"]
        for series in ("mean after projector", "knockout"):
            found = flow_localisation(rows[rows.flow.astype(str) == series], lines)[0]
            where = "after the projector" if series != "knockout" else f"hidden in vision block {found['window']}"
            out.append(f"  encoder-flow ({series}): the largest drop, {found['drop_pct']}%, {where}, at cell "
                       f"{found['top_cell']}")
    if "encoder" in tables:
        rows = tables["encoder"][tables["encoder"].variant.astype(str) == "Full"]
        firsts = {block: list(order[0]) for (_, block), order in sorted(cells_ranked(rows, "l2_distance").items())}
        out.append("  encoder measure: the cell that moves each vision block's update most (the tower has not "
                   f"seen the question): {firsts}")
    if "deepstack" in tables:
        rows = tables["deepstack"]
        found = flow_localisation(rows[rows.flow.astype(str) == "removed at the unit"], lines)[0]
        out.append(f"  deepstack: removing the level added after layer {found['window']} drops p most, "
                   f"{found['drop_pct']}%, at cell {found['top_cell']}")
    return out


def look_command(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vl_masking.planted look")
    parser.add_argument("pictures", help="the pictures.jsonl the picture came from")
    parser.add_argument("id", help="the line's id (picture0000-square)")
    parser.add_argument("files", nargs="+", help="the run's result files (Parquet)")
    args = parser.parse_args(argv)
    for text in look(args.files, read_lines(args.pictures)[args.id]):
        print(text)


if __name__ == "__main__":
    main()
