"""Loading: model, tokenizer and image processor; the prompt as model inputs.

Qwen3-VL prompts are built from AutoTokenizer + AutoImageProcessor rather than
AutoProcessor, because AutoProcessor also builds the video processor, which needs
torchvision (not available on CPU-only machines). The result equals what the
processor produces: the chat format with each image's single <|image_pad|>
expanded to t*h*w / merge^2 pads, and mm_token_type_ids marking the pads.
"""

import json
import tempfile
from dataclasses import dataclass, field

import torch

from .capture import check_supported
from .options import DEVICE_MAP_STRATEGIES, RunSettings, UsageError

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    image_processor: object | None
    name: str
    device: torch.device
    dtype: torch.dtype
    is_vision_language: bool


@dataclass
class PromptInputs:
    """Model inputs for one prompt plus what the token map needs."""

    model_kwargs: dict
    input_ids: torch.Tensor  # (1, prompt_len)
    image_grid_thw: torch.Tensor | None = None  # (num_images, 3)
    image_sizes: list = field(default_factory=list)  # (width, height) of each original image
    merge_size: int = 2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_model(settings: RunSettings, vision_language: bool) -> LoadedModel:
    """Load model, tokenizer and (for VL) image processor; loading failures become UsageError.

    With --device-map, accelerate places the modules (several GPUs, CPU, disk) and moves
    activations between them; the inputs go where the embeddings are.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    device_map = _device_map(settings.device_map)
    device = resolve_device("auto" if device_map else settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    remote = settings.trust_remote_code
    auto_class = AutoModelForImageTextToText if vision_language else AutoModelForCausalLM
    placement = {}
    if device_map is not None:
        placement = {"device_map": device_map}
        if isinstance(device_map, dict) and "disk" in device_map.values():
            placement["offload_folder"] = tempfile.mkdtemp(prefix="mask-impact-offload-")
    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.model, trust_remote_code=remote)
        image_processor = load_image_processor(settings.model, remote) if vision_language else None
        model = auto_class.from_pretrained(settings.model, dtype=dtype, trust_remote_code=remote, **placement)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load model '{settings.model}': {first_line}") from None
    if device_map is None:
        model.to(device)
    else:
        device = model.get_input_embeddings().weight.device
        if device.type == "meta":  # the embeddings themselves are offloaded: they run on the CPU
            device = torch.device("cpu")
    model.eval()
    check_supported(model)  # refuse unsupported attention before any work
    return LoadedModel(model=model, tokenizer=tokenizer, image_processor=image_processor, name=settings.model,
                       device=device, dtype=dtype, is_vision_language=vision_language)


def _device_map(value):
    """None, a strategy name accelerate knows, or the {module: device} mapping of a JSON file."""
    if value is None or value in DEVICE_MAP_STRATEGIES:
        return value
    with open(value, encoding="utf-8") as handle:
        return json.load(handle)


def load_image_processor(model: str, remote: bool):
    """The model's image processor; its PIL backend where torchvision is missing (CPU-only machines)."""
    import transformers
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model, trust_remote_code=remote)
    except ImportError:
        # transformers before 5.24 does not fall back by itself: pick the PIL class of the
        # configured one (Qwen2VLImageProcessor[Fast] -> Qwen2VLImageProcessorPil).
        config = transformers.ImageProcessingMixin.get_image_processor_dict(model)[0]
        name = config.get("image_processor_type", "").removesuffix("Fast") + "Pil"
        if not hasattr(transformers, name):
            raise
        return getattr(transformers, name).from_pretrained(model)


def stop_token_ids(tokenizer) -> list:
    ids = {tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)


def build_vl_inputs(loaded: LoadedModel, prompt: str, image_paths: list) -> PromptInputs:
    """Qwen3-VL chat-format inputs: one vision block per image (in order), then the prompt text."""
    from PIL import Image

    tok = loaded.tokenizer
    grid, pixel_values, sizes = None, None, []
    pads_per_image = []
    merge = getattr(loaded.image_processor, "merge_size", 2)
    if image_paths:
        images = []
        for path in image_paths:
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except OSError as exc:
                raise UsageError(f"not a readable image: {path} ({exc})") from None
        sizes = [im.size for im in images]
        processed = loaded.image_processor(images=images, return_tensors="pt")
        grid = processed["image_grid_thw"]
        pixel_values = processed["pixel_values"]
        pads_per_image = [int(thw.prod()) // merge**2 for thw in grid]
    vision = "".join(VISION_START + IMAGE_PAD * n + VISION_END for n in pads_per_image)
    text = f"<|im_start|>user\n{vision}{prompt}<|im_end|>\n<|im_start|>assistant\n"
    input_ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    pad_id = tok.convert_tokens_to_ids(IMAGE_PAD)
    if int((input_ids == pad_id).sum()) != sum(pads_per_image):
        raise UsageError(f"the prompt text must not contain {IMAGE_PAD} itself")
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "mm_token_type_ids": (input_ids == pad_id).long()}
    if grid is not None:
        kwargs["pixel_values"] = pixel_values.to(loaded.dtype)
        kwargs["image_grid_thw"] = grid
    kwargs = {k: v.to(loaded.device) for k, v in kwargs.items()}
    return PromptInputs(model_kwargs=kwargs, input_ids=input_ids, image_grid_thw=grid,
                        image_sizes=sizes, merge_size=merge)


def build_text_inputs(loaded: LoadedModel, prompt: str, chat: bool) -> PromptInputs:
    """Plain text (the default) or the tokenizer's chat template (`--chat`)."""
    tok = loaded.tokenizer
    if chat:
        if not getattr(tok, "chat_template", None):
            raise UsageError(f"--chat: the tokenizer of '{loaded.name}' has no chat template")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        input_ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    else:
        input_ids = tok(prompt, return_tensors="pt")["input_ids"]
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    kwargs = {k: v.to(loaded.device) for k, v in kwargs.items()}
    return PromptInputs(model_kwargs=kwargs, input_ids=input_ids)
