"""Pictures as a viewer shows them: opened once their size is within the limits (checked from the header, naming
the file), EXIF orientation applied, 16-bit scaled to 8 bits, alpha laid over white. The images of a prompt, the
frames of a folder of frames and the figures' backgrounds are all read here."""

from contextlib import contextmanager

import numpy as np

from .errors import UsageError


@contextmanager
def sized_image(path: str, max_pixels: int | None = None):
    """The opened image, once its size is within the limits (checked from the header, naming the file)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # Pillow's own bomb check would not name the file or the option
    try:
        with Image.open(path) as im:
            check_pixels(path, im.size, max_pixels)
            yield im
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def open_image(path: str, max_pixels: int | None = None):
    """An RGB image as a viewer shows it: EXIF orientation applied, 16-bit scaled to 8, alpha over white."""
    from PIL import ImageOps

    try:
        with sized_image(path, max_pixels) as im:
            im.load()
            image = ImageOps.exif_transpose(im)
    except OSError as exc:
        raise UsageError(f"not a readable image: {path} ({exc})") from None
    return to_rgb(image)


def to_rgb(image):
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit depth: PIL's convert() clips to 0..255 (a 16-bit photo turns white); scale instead.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        if image.mode == "F" and values.max() <= 1.0:
            top = 1.0
        gray = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_pixels(path: str, size: tuple, max_pixels: int | None) -> None:
    width, height = size
    limit = max_pixels or DEFAULT_MAX_PIXELS
    if width * height > limit:
        raise UsageError(f"image {path} is {width}x{height} = {width * height:,} pixels, above the limit of "
                         f"{limit:,} (a guard against decompression bombs); raise it with --max-image-pixels")
    if min(width, height) == 0:
        raise UsageError(f"image {path} is {width}x{height}: it has no pixels")


DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
