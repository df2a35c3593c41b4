"""Loading and prompts: tokenizer, image processor and model; images; the prompt as model inputs.

Loading happens in two stages so that every problem with the prompt is found before the
weights are read: `load_model(..., weights=False)` gives the tokenizer, image processor and
config, `build_inputs` makes the model inputs and the token map (spans and groups are
checked against it), and `load_weights` reads the model.

Vision-language prompts are built from AutoTokenizer + AutoImageProcessor rather than
AutoProcessor, because AutoProcessor also builds a video processor, which needs torchvision
(not available on CPU-only machines; the image processor falls back to its PIL backend). The
prompt is the checkpoint's own chat template when it has one (the tokenizer's, or the
processor's chat_template.json), with the images where the template puts them; otherwise the
family's built-in chat format. The family's adapter (vl_masking/models/) turns the images into
model inputs and says how many tokens each takes; each image's placeholder token is expanded to
that many, as the family's processor does.
"""

import json
import os
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse


from .errors import UnsupportedModelError, UsageError
from .checkpoints import checkpoint, gguf_description, parsed_once
from .tokens import PromptLayout, build_token_map, special_token_ids
from .tools import TOOLS
from .pictures import open_image


@dataclass
class LoadedModel:
    tokenizer: object
    image_processor: object | None
    config: object
    name: str
    tool: str
    model: object = None  # the torch module, once load_weights has run
    device: object = None
    dtype: object = None
    head_float32: tuple | None = None  # (weight, bias) of the LM head in float32, made once for flow analysis
    # layer -> ((o_proj weight's data pointer, version), its per-head d x d Gram matrices), made once for the
    # attention measure: a weights-only product that every run with this model shares
    head_grams: dict = field(default_factory=dict, repr=False)
    gguf: dict | None = None  # a GGUF checkpoint: its file and quantisation type
    _adapter: object = field(default=None, repr=False)

    @property
    def is_vision_language(self) -> bool:
        return TOOLS[self.tool].takes_images

    @property
    def text_config(self):
        return getattr(self.config, "text_config", None) or self.config

    @property
    def adapter(self):
        """The vision-language family's adapter (vl_masking/models/); None for a text model."""
        if not self.is_vision_language:
            return None
        if self._adapter is None:
            from .models import adapter_for

            self._adapter = adapter_for(self.config, self.tokenizer, self.image_processor)
        return self._adapter


@dataclass
class PromptInputs:
    """Model inputs for one prompt plus what the token map needs."""

    model_kwargs: dict
    input_ids: object  # (1, prompt_len) tensor on the CPU
    image_views: list = field(default_factory=list)  # per picture (the images, then the videos), its views
    image_sizes: list = field(default_factory=list)  # (width, height) of each picture as seen (a video's frames)
    image_paths: list = field(default_factory=list)
    videos: list = field(default_factory=list)  # per video, what was sampled from it (models.VideoClip)
    vision_token_ids: tuple = ()  # the tokens whose runs hold the pictures' views
    position_kwargs: tuple = ()  # names of model_kwargs with one value per position (mm_token_type_ids)
    prompt_format: str = "raw"
    model_vision_attention: str = "causal"  # the model's own attention among an image's tokens
    layout: PromptLayout = field(default_factory=PromptLayout)
    warnings: list = field(default_factory=list)
    tokens: object = None  # the prompt's TokenMap

    @property
    def prompt_length(self) -> int:
        return int(self.input_ids.shape[1])

    def token_map(self, tokenizer, ids, layout=None):
        """The token map of `ids` (this prompt, or the prompt and what was generated after it)."""
        return build_token_map(tokenizer, ids, self.vision_token_ids, self.image_views, self.image_sizes,
                               self.image_paths, prompt_length=self.prompt_length, layout=layout)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# -- loading ------------------------------------------------------------------------------

def load_model(settings, weights: bool = True) -> LoadedModel:
    """Tokenizer, image processor (VL) and config; the weights too unless weights=False.

    Loading failures become UsageError (one line, exit 2), naming the model.
    """
    go_offline_if_hub_unreachable(settings.model)
    quiet_transformers()
    with parsed_once():  # a GGUF file: parsed once for its checks, the config, the tokenizer and the weights
        source, files = checkpoint(settings.model)
        return _load_model(settings, weights, source, files)


def _load_model(settings, weights: bool, source: str, files: dict) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    from .anatomy import check_config

    tool = TOOLS[settings.tool]
    remote = settings.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=remote, **files)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=remote, **files)
        image_processor = load_image_processor(source, remote) if tool.takes_images else None
    except ImportError as exc:
        raise UsageError(f"cannot load model '{settings.model}': {exc}".splitlines()[0]) from None
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is one line, whatever the reader raises
        if not isinstance(exc, (OSError, ValueError, KeyError)) and not files:
            raise
        raise UsageError(load_failure(settings.model, exc)) from None
    loaded = LoadedModel(tokenizer=tokenizer, image_processor=image_processor, config=config, name=settings.model,
                         tool=settings.tool, gguf=gguf_description(source, files))
    try:
        check_config(config)  # what the engine cannot reproduce is refused before the weights load
    except UnsupportedModelError as exc:
        raise UsageError(f"cannot analyse '{settings.model}': {exc}") from None
    if tool.takes_images:
        try:
            loaded.adapter  # a family this tool has no adapter for is refused before the weights load
        except UnsupportedModelError as exc:
            raise UsageError(f"cannot analyse '{settings.model}' with images: {exc}") from None
        if getattr(settings, "videos", None) and not loaded.adapter.takes_videos:
            from .models import ADAPTERS

            able = sorted({cls.family for cls in ADAPTERS.values() if cls.video_token})
            raise UsageError(f"cannot analyse '{settings.model}' with videos: this tool reads videos for "
                             f"{', '.join(able)} ({loaded.adapter.family} is not one of them)")
        most = loaded.adapter.videos_per_prompt
        if most is not None and len(getattr(settings, "videos", None) or ()) > most:
            raise UsageError(f"{loaded.adapter.family} takes {most} --video per prompt here (its model stacks a "
                             f"prompt's videos into one tensor), and {len(settings.videos)} were given")
    if weights:
        load_weights(loaded, settings)
    return loaded


def load_weights(loaded: LoadedModel, settings) -> LoadedModel:
    """Read the model (placed by accelerate with --device-map) and refuse what the engine cannot reproduce."""
    import torch
    import transformers

    from .capture import check_supported

    device_map = _device_map(settings.device_map)
    device = resolve_device("auto" if device_map else settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    auto_class = getattr(transformers, TOOLS[settings.tool].model_class)
    placement = {}
    if device_map is not None:
        placement = {"device_map": device_map}
        if isinstance(device_map, dict) and "disk" in device_map.values():
            placement["offload_folder"] = tempfile.mkdtemp(prefix="mask-impact-offload-")
    source, files = checkpoint(settings.model)
    # a GGUF file's config is the one already read: parsing its header again takes seconds
    parsed = {"config": loaded.config} if files else {}
    try:
        with gguf_bar_for_logs(bool(files)), parsed_once():
            model = auto_class.from_pretrained(source, dtype=dtype, trust_remote_code=settings.trust_remote_code,
                                               **files, **parsed, **placement)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(load_failure(settings.model, exc)) from None
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":
            raise UsageError(f"cannot load model '{settings.model}': {damaged_weights(settings.model, exc)}") from None
        if files:  # the GGUF reader's own errors (a truncated tensor block): one line
            raise UsageError(load_failure(settings.model, exc)) from None
        raise
    if device_map is None:
        model.to(device)
    else:
        device = model.get_input_embeddings().weight.device
        if device.type == "meta":  # the embeddings themselves are offloaded: they run on the CPU
            device = torch.device("cpu")
    model.eval()
    check_supported(model)  # refuse unsupported attention before any work
    loaded.model, loaded.device, loaded.dtype = model, device, dtype
    return loaded


@contextmanager
def gguf_bar_for_logs(gguf: bool):
    """transformers de-quantizes a GGUF file under a tqdm bar of its own (not one its logging switches off): off a
    terminal, where its carriage returns pile up in a log, it is turned off; a line says what happens instead."""
    import sys

    if not gguf or sys.stderr.isatty():
        yield
        return
    from functools import partial

    import transformers.modeling_gguf_pytorch_utils as reader

    bar = getattr(reader, "tqdm", None)
    print("Converting and de-quantizing the GGUF tensors ...", file=sys.stderr, flush=True)
    if bar is not None:
        reader.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            reader.tqdm = bar


def quiet_transformers() -> None:
    """No "Loading weights" / "Writing model shards" bars from transformers (ours stay; so do downloads')."""
    import huggingface_hub.utils
    from transformers.utils import logging

    logging.disable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()


def load_failure(model: str, exc: Exception) -> str:
    text = str(exc).strip()
    first_line = text.splitlines()[0] if text else type(exc).__name__
    if _is_hub_id(model) and _offline():
        return (f"cannot load model '{model}': it is not in the local cache and the model hub cannot be reached; "
                "give a local model directory or connect to the network")
    return f"cannot load model '{model}': {first_line}"


def damaged_weights(model: str, exc: Exception) -> str:
    """Name the weights file whose header or body is damaged."""
    from safetensors import safe_open

    directory = Path(model)
    for path in sorted(directory.glob("*.safetensors")) if directory.is_dir() else []:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    handle.get_slice(name)
        except Exception as inner:  # noqa: BLE001 - any failure names this file
            return f"{path} is damaged or truncated ({' '.join(str(inner).split())[:120]})"
    return f"a weights file is damaged or truncated ({' '.join(str(exc).split())[:120]})"


def _is_hub_id(model: str) -> bool:
    """A name the hub would look up: not a local directory, file or .gguf path."""
    path = os.path.expanduser(model)
    return not (os.path.isdir(path) or os.path.isfile(path) or model.lower().endswith(".gguf"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") == "1"


def go_offline_if_hub_unreachable(model: str) -> None:
    """Without a network, hub look-ups retry for most of a minute: probe once, then use the local cache only."""
    if not _is_hub_id(model):
        return
    if not _offline():
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        parsed = urlparse(endpoint)
        try:
            with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=3):
                return
        except OSError:
            os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants as hub  # read its environment at import: tell it now

    hub.HF_HUB_OFFLINE = True


def _device_map(value):
    """None, a strategy name accelerate knows (options.DEVICE_MAP_STRATEGIES checked it), or the {module: device}
    mapping of a JSON file."""
    if value is None or not str(value).endswith(".json"):
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


def stop_token_ids(loaded) -> list:
    """The tokens generation stops at: the tokenizer's and the checkpoint's EOS, the token the chat template
    ends an assistant turn with (<|im_end|>, <end_of_turn>, <|eot_id|>: read from the template, so a text
    family needs no entry here), and the family adapter's own for its built-in prompt."""
    tokenizer = loaded.tokenizer
    ids = {tokenizer.eos_token_id, *_as_list(getattr(getattr(loaded.model, "generation_config", None),
                                                     "eos_token_id", None)), end_of_turn_id(tokenizer)}
    if loaded.adapter is not None:
        ids |= {tokenizer.convert_tokens_to_ids(t) for t in loaded.adapter.stop_tokens}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant's message, or None (no template, or
    one that writes none)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    mark = "Zq9"  # a reply no template changes
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"},
                                              {"role": "assistant", "content": mark}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template with its own rules (no assistant turns, say): none read
        return None
    after = text[text.rfind(mark) + len(mark):] if mark in text else ""
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    return ids[0] if ids and ids[0] in special_token_ids(tokenizer) else None


# -- prompts ------------------------------------------------------------------------------

def build_inputs(loaded: LoadedModel, settings) -> PromptInputs:
    """The prompt as model inputs, with its token map; UsageError for what does not fit."""
    import torch

    tok = loaded.tokenizer
    adapter = loaded.adapter
    batch, sizes, views = None, [], []
    if settings.images:
        images = [open_image(path, settings.max_image_pixels) for path in settings.images]
        sizes = [im.size for im in images]
        for path, (width, height) in zip(settings.images, sizes):
            refusal = adapter.check_image_size(path, width, height)
            if refusal:
                raise UsageError(refusal)
        batch = adapter.process_images(images)
        views = list(batch.views)
    clips = None
    if settings.videos:
        from .video import probe

        sources = [probe(path, settings.max_image_pixels) for path in settings.videos]
        clips = adapter.process_videos(sources, settings.fps, settings.max_frames)
        sizes += [(clip.width, clip.height) for clip in clips.clips]
    num_images, num_videos = len(views), len(settings.videos)
    text, prompt_format = render_prompt(loaded, settings, num_images, num_videos)
    vision_tokens = {adapter.placeholder, adapter.image_token, adapter.video_token} - {""} if adapter else set()
    for token in sorted(vision_tokens):
        if token in settings.prompt or token in (settings.system or ""):
            raise UsageError(f"the prompt text must not contain {token} itself")
    if num_images:
        text = _expand(text, adapter.placeholder, views, adapter.image_text, "image", "--image")
    if num_videos:
        text = _expand(text, adapter.video_placeholder, clips.views, adapter.video_text, "video", "--video")
        views += clips.views
    add_special = prompt_format == "raw"
    ids, offsets = tokenize_with_offsets(tok, text, add_special)
    layout = PromptLayout(text=text, offsets=offsets, question=_locate(text, settings.prompt),
                          system=_locate(text, settings.system) if settings.system else None)
    input_ids = torch.tensor([ids], dtype=torch.long)
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    positional = adapter.position_kwargs(input_ids, batch) if adapter else {}
    kwargs.update(positional)
    for part in (batch, clips):
        if part is not None:
            kwargs.update(part.kwargs)
    inputs = PromptInputs(model_kwargs=kwargs, input_ids=input_ids, image_views=views, image_sizes=sizes,
                          image_paths=list(settings.images) + list(settings.videos),
                          videos=list(clips.clips) if clips else [],
                          vision_token_ids=adapter.vision_token_ids if adapter else (),
                          position_kwargs=tuple(positional),
                          prompt_format=prompt_format, layout=layout,
                          model_vision_attention=adapter.native_vision_attention if adapter else "causal",
                          warnings=special_token_warnings(tok, settings, vision_tokens))
    inputs.tokens = inputs.token_map(tok, ids, layout)
    max_length = getattr(loaded.text_config, "max_position_embeddings", None)
    if max_length and inputs.prompt_length + settings.num_tokens > max_length:
        raise UsageError(f"--num-tokens {settings.num_tokens}: the prompt has {inputs.prompt_length} tokens and the "
                         f"model's maximum length is {max_length}")
    return inputs


def _expand(text: str, placeholder: str, views: list, expansion, what: str, option: str) -> str:
    """The rendered prompt with each placeholder replaced by its picture's tokens (expansion(views))."""
    pieces = text.split(placeholder)
    if len(pieces) - 1 != len(views):
        found = f"does not place {what}s (a text-only template)" if len(pieces) == 1 else \
            f"placed {len(pieces) - 1} {what}(s) for {len(views)} {option}"
        raise UsageError(f"the chat template used {found}; use --chat-template builtin (the family's format) or "
                         "--chat-template FILE")
    return pieces[0] + "".join(expansion(v) + rest for v, rest in zip(views, pieces[1:]))


def to_device(inputs: PromptInputs, loaded: LoadedModel) -> dict:
    """The model kwargs on the model's device, floating inputs (pixel values) in its dtype."""
    return {k: v.to(loaded.device, loaded.dtype if v.is_floating_point() else v.dtype)
            for k, v in inputs.model_kwargs.items()}


def render_prompt(loaded: LoadedModel, settings, num_images: int, num_videos: int = 0) -> tuple:
    """(prompt text with the family's placeholder once per image, then once per video; the format used)."""
    tool = TOOLS[loaded.tool]
    chat = settings.chat or tool.chat == "always"
    if not chat:
        if settings.system:
            raise UsageError("--system needs --chat (a system prompt is part of a chat template)")
        return settings.prompt, "raw"
    if settings.chat_template == "builtin":
        template = None
    elif settings.chat_template:
        template = Path(settings.chat_template).read_text(encoding="utf-8")
    else:
        template = chat_template(loaded)
    if template is None:
        if not tool.takes_images:
            raise UsageError(f"--chat: the tokenizer of '{loaded.name}' has no chat template (give --chat-template FILE)")
        adapter = loaded.adapter
        videos = {"num_videos": num_videos} if num_videos else {}
        return (adapter.builtin_prompt(settings.prompt, num_images, settings.system, **videos),
                f"built-in {adapter.family} chat")
    source = f"--chat-template {settings.chat_template}" if settings.chat_template else \
        f"the chat template of '{loaded.name}'"
    if tool.takes_images:
        user = [{"type": "image"} for _ in range(num_images)] + [{"type": "video"} for _ in range(num_videos)] + \
            [{"type": "text", "text": settings.prompt}]
        system = [{"type": "text", "text": settings.system}] if settings.system else None
    else:
        user, system = settings.prompt, settings.system
    try:
        text = _apply_template(loaded, template, user, system)
    except Exception as exc:  # noqa: BLE001 - a template error is the checkpoint's, reported in one line
        if tool.takes_images and _renders_text_only(loaded, template, settings):
            raise UsageError(f"{source} is text-only (its messages are plain strings): it does not place images; "
                             "use --chat-template builtin (the family's format) or --chat-template FILE") from None
        raise UsageError(f"{source} failed: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:160]}") from None
    return text, "chat template" if not settings.chat_template else "chat template " + settings.chat_template


def _apply_template(loaded: LoadedModel, template: str, user, system) -> str:
    """The prompt text of one user turn (and a system turn) as the template writes it, ready to generate."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return loaded.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=True)


def _renders_text_only(loaded: LoadedModel, template: str, settings) -> bool:
    """Whether a template that failed on image messages renders the same prompt as plain strings."""
    try:
        _apply_template(loaded, template, settings.prompt, settings.system)
    except Exception:  # noqa: BLE001 - it fails on text too: not a text-only template
        return False
    return True


def chat_template(loaded: LoadedModel) -> str | None:
    """The checkpoint's chat template: the tokenizer's, else the processor's chat_template.json / .jinja."""
    template = getattr(loaded.tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        return template
    if not loaded.is_vision_language:
        return None
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            path = cached_file(loaded.name, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:
            path = None
        if path:
            text = Path(path).read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def tokenize_with_offsets(tokenizer, text: str, add_special_tokens: bool) -> tuple:
    """Token ids and each token's (start, end) character range in `text`."""
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        offsets, at = [], 0
        for token_id in ids:  # slow tokenizers: walk the decoded pieces through the text
            piece = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            found = text.find(piece, at) if piece else -1
            start = found if found >= 0 else at
            end = start + len(piece) if found >= 0 else at
            offsets.append((start, end))
            at = end
        return list(ids), offsets


def _locate(text: str, part: str) -> tuple:
    at = text.rfind(part)
    return (at, at + len(part)) if at >= 0 else (0, 0)


def special_token_warnings(tokenizer, settings, image_tokens=()) -> list:
    """Special-token strings typed into the prompt are read as those tokens (as transformers' processors do)."""
    specials = sorted({tokenizer.convert_ids_to_tokens(i) for i in special_token_ids(tokenizer)} - {None, *image_tokens})
    found = [s for s in specials if s in settings.prompt or s in (settings.system or "")]
    if not found:
        return []
    return [f"warning: the prompt contains special-token text ({', '.join(found)}); it is read as those tokens, "
            "as the model's own processor would"]
