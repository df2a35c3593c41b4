"""Model adapters: everything that differs between vision-language families, one module per family.

An adapter answers, for the checkpoint it is made for: which text the chat template writes for an
image (and the built-in prompt when a checkpoint has no template, with the end-of-turn tokens it
ends a turn with), how images become the model's inputs and how many tokens each one takes, where
those tokens lie on the image (the views: rows and columns of one grid per image, or of one grid
per tile and the thumbnail), which extra inputs the model needs per position, what it adds to the
residual stream after some decoder layers (Qwen3-VL's DeepStack), the family's limits on images,
and what its own prompt attention is. The loading code, the token map, the engines, the reference and the
console read these answers and never a family's token names.

    python -c "from vl_masking.models import ADAPTERS; print(sorted(ADAPTERS))"

A new family is one module here that registers its adapter class for the config's `model_type`s
(imported below), plus its tests.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ..errors import UnsupportedModelError

ADAPTERS = {}  # config.model_type -> adapter class


def register(cls):
    for model_type in cls.model_types:
        ADAPTERS[model_type] = cls
    return cls


@dataclass(frozen=True)
class View:
    """One grid of an image's tokens, row-major: token i of the view sits at (i // cols, i % cols).

    Most families give one view per image. A family that cuts the picture into tiles (InternVL) gives
    one view per tile and one for the thumbnail, in the order of their tokens in the sequence. A view
    with a separator has one more token after each row, which is no cell of the grid: token i sits at
    (i // (cols + 1), i % (cols + 1)), the last of each row being the separator.
    """

    rows: int
    cols: int
    region: tuple | None = None  # (x0, y0, x1, y1) of the picture the view covers, in its pixels; None: all of it
    name: str = ""  # "tile 0,1", "thumbnail"; "" when the image is a single view
    tile: tuple = ()  # (row, col) of a tile in the picture's grid of tiles; () for other views
    separator: str = ""  # a token that ends each row and is no cell (LLaVA-NeXT's image newline); "" for none
    blended: bool = False  # the model resampled the grid: each cell blends the patches it replaced (OneVision)
    video: bool = False  # a temporal patch of a video (its frames seen as one grid): name "frame K"
    time: float | None = None  # a video view's time in seconds (the mean of its first and last frame's)
    frames: tuple = ()  # a video view's frames, as indices into the source (a padded patch repeats its last)
    trailer: str = ""  # a token after the last row that is no cell (the newline closing a LLaVA-OneVision video)

    @property
    def tokens(self) -> int:
        return self.rows * (self.cols + bool(self.separator)) + bool(self.trailer)


def tile_region(width: int, height: int, rows: int, cols: int, r: int, c: int) -> tuple:
    """(x0, y0, x1, y1), in the picture's pixels, of tile (r, c) when the picture is stretched over
    rows x cols tiles and cut row by row."""
    return (round(c * width / cols, 3), round(r * height / rows, 3), round((c + 1) * width / cols, 3),
            round((r + 1) * height / rows, 3))


@dataclass
class ImageBatch:
    """The prompt's images (or videos) as the model takes them."""

    kwargs: dict  # model inputs for the images (pixel_values, image_grid_thw, ...), as the processor made them
    views: list  # per image, its views (a list of View) in sequence order: the image's run of tokens, split
    clips: list = field(default_factory=list)  # per video: what was sampled from it (VideoClip)


@dataclass(frozen=True)
class VideoClip:
    """What a video became: the frames sampled from the source, as the family's video processor samples them."""

    path: str
    source_frames: int  # frames in the source
    source_fps: float | None  # None for a folder of frames
    assumed_fps: float | None  # the frame rate the family's processor assumed where the source has none
    indices: tuple  # the sampled frames, as indices into the source
    width: int  # a frame's size as decoded
    height: int

    def to_dict(self) -> dict:
        fps = self.source_fps or self.assumed_fps
        return {"path": self.path, "source_frames": self.source_frames, "source_fps": self.source_fps,
                "assumed_fps": self.assumed_fps, "width": self.width, "height": self.height,
                "frames": [{"index": i, "time": round(i / fps, 6) if fps else None} for i in self.indices]}

    @property
    def tokens(self) -> list:
        """How many image tokens each image takes in the sequence."""
        return [sum(view.tokens for view in views) for views in self.views]


class VisionAdapter(ABC):
    """One vision-language family. Made per loaded checkpoint from its config, tokenizer and image processor."""

    model_types: tuple = ()
    family = ""  # shown in the metadata and the README table
    image_token = ""  # what the chat template writes for one image; expanded to the image's tokens
    native_vision_attention = "causal"  # the model's own prompt attention among an image's tokens
    # the tokens that end a turn of builtin_prompt's format: generation stops at them (and at those the
    # checkpoint's own chat template ends a turn with, and its EOS: inputs.stop_token_ids)
    stop_tokens: tuple = ()

    def __init__(self, config, tokenizer, image_processor):
        self.config, self.tokenizer, self.image_processor = config, tokenizer, image_processor

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def placeholder(self) -> str:
        """What the chat template writes for one image (the processor expands it with image_text)."""
        return self.image_token

    def image_text(self, views: list) -> str:
        """The prompt text that stands for one image of these views (by default one run of image_token)."""
        return self.image_token * sum(view.tokens for view in views)

    @abstractmethod
    def builtin_prompt(self, prompt: str, num_images: int, system: str | None, num_videos: int = 0) -> str:
        """The family's chat format with one placeholder per image (then per video), for checkpoints without a
        chat template."""

    @abstractmethod
    def process_images(self, images: list) -> ImageBatch:
        """PIL images (RGB, as seen) -> the model's image inputs, tokens per image and their grids."""

    # -- videos (a family that takes none leaves video_token empty) --
    video_token = ""  # the token a video's views are runs of
    videos_per_prompt: int | None = None  # the most --video a prompt may hold; None: any number

    @property
    def takes_videos(self) -> bool:
        return bool(self.video_token)

    @property
    def video_placeholder(self) -> str:
        """What the chat template writes for one video (replaced by video_text)."""
        return self.video_token

    @property
    def vision_token_ids(self) -> tuple:
        """The tokens whose runs hold the pictures' views: the image token, and the video token if any."""
        ids = (self.image_token_id,) + ((self.tokenizer.convert_tokens_to_ids(self.video_token),)
                                         if self.video_token else ())
        return ids

    def process_videos(self, sources: list, fps: float | None, max_frames: int | None) -> ImageBatch:
        """video.VideoSource of each --video -> the model's video inputs, each video's views (one per temporal
        patch) and what was sampled (clips); --fps and --max-frames change the family's sampling."""
        raise NotImplementedError(f"{self.family} takes no videos in this tool")

    def video_text(self, views: list) -> str:
        """The prompt text that stands for one video of these views."""
        return self.video_token * sum(view.tokens for view in views)

    def position_kwargs(self, input_ids, batch: ImageBatch) -> dict:
        """Extra model inputs with one value per sequence position (zero for later positions)."""
        return {}

    def layer_additions(self, text_model_kwargs: dict):
        """What the model adds to the residual stream after some decoder layers, read from the language model's
        call: (positions (S,) bool, [features (n, D) added at them after layer l, for l = 0, 1, ...]), or None.
        The engines add the same features where they re-run those layers."""
        return None

    def deepstack_levels(self) -> list:
        """The levels of what layer_additions adds (Qwen3-VL's DeepStack), from the config: per level, (the vision
        block its features are taken from, the decoder layer they are added after); [] for a family without."""
        return []

    def check_image_size(self, path: str, width: int, height: int) -> str | None:
        """A reason this family's processor refuses an image of this size, or None."""
        return None

    def tower_refusal(self) -> str | None:
        """Why the encoder measure cannot reproduce this checkpoint's vision tower (read from the config, before
        the weights load), or None when it can."""
        return f"the encoder measure does not reproduce {self.family}'s vision tower yet"

    def tower_blocks(self) -> tuple:
        """(the tower's number of blocks, the blocks whose output reaches the language model, why the others do
        not or None), from the config."""
        raise NotImplementedError(self.tower_refusal())

    def tower(self, model, model_kwargs: dict, views: list):
        """The vision tower of the loaded model for these image inputs, or video inputs (tower.Tower): its blocks,
        their anatomy, the tower tokens under each language-model token of each picture or video (views: per one,
        its views in sequence order, as process_images or process_videos made them). Only where tower_refusal is
        None."""
        raise NotImplementedError(self.tower_refusal())


def adapter_for(config, tokenizer, image_processor) -> VisionAdapter:
    """The adapter of a vision-language checkpoint; UnsupportedModelError naming the families there are."""
    model_type = getattr(config, "model_type", "")
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise UnsupportedModelError(f"{model_type or type(config).__name__} is not a vision-language family this "
                                    f"tool knows (known: {', '.join(sorted(ADAPTERS))})")
    return cls(config, tokenizer, image_processor)


# each registers its adapter
from . import gemma3, idefics3, internvl, llava, llava_next, llava_onevision, qwen_vl  # noqa: E402,F401
