"""Videos: a clip's frames, read with PyAV (a file) or Pillow (a folder of frames), checked before the model loads.

A video is a file FFmpeg reads (mp4, webm, mkv, avi, gif, ...) or a folder of frames taken in name order. Reading
is two steps, so that memory holds only the frames a model takes: `probe` counts the frames and reads the frame
rate and size (and refuses what cannot be read, in one line); the family's adapter picks the frames to sample, as
its video processor does; `read_frames` decodes the clip once and keeps those.

The frame count is the stream's own, as transformers' PyAV reader takes it; a stream that does not say (GIF,
some webm) is counted by decoding. A folder has no frame rate: `fps` is None and the adapter says what it assumes.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsageError

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class VideoSource:
    """What a clip holds, before any frame is decoded."""

    path: str
    frames: int  # frames in the source
    fps: float | None  # the source's frames per second; None for a folder of frames
    width: int
    height: int

    @property
    def is_folder(self) -> bool:
        return Path(self.path).is_dir()


def probe(path: str, max_pixels: int | None = None) -> VideoSource:
    """The clip's frame count, frame rate and size; UsageError (one line, naming the file) for what cannot be read,
    holds no frame, or has frames above the pixel limit."""
    from .pictures import check_pixels

    source = _probe_folder(path) if Path(path).is_dir() else _probe_file(path)
    if source.frames == 0:
        raise UsageError(f"video {path} has no frames")
    check_pixels(f"{path} (a frame)", (source.width, source.height), max_pixels)
    return source


def _probe_file(path: str) -> VideoSource:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UsageError(f"video {path} has no frames (it holds no video stream)")
            stream = container.streams.video[0]
            frames, rate = int(stream.frames or 0), stream.average_rate
            width, height = stream.codec_context.width, stream.codec_context.height
            if frames == 0:  # the stream does not say: count by decoding
                frames = sum(1 for _ in container.decode(video=0))
    except UsageError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise UsageError(f"not a readable video: {path} ({' '.join(str(exc).split())[:120]})") from None
    return VideoSource(str(path), frames, float(rate) if rate else None, int(width), int(height))


def _probe_folder(path: str) -> VideoSource:
    from PIL import Image, UnidentifiedImageError

    files = frame_files(path)
    if not files:
        return VideoSource(str(path), 0, None, 0, 0)
    sizes = set()
    for file in files:
        if file.suffix.lower() not in FRAME_SUFFIXES:
            raise UsageError(f"video {path}: {file.name} is not an image (a folder of frames holds images only)")
        try:
            with Image.open(file) as im:
                sizes.add(im.size)
        except (OSError, UnidentifiedImageError) as exc:
            raise UsageError(f"video {path}: {file.name} is not a readable image ({exc})") from None
    if len(sizes) > 1:
        raise UsageError(f"video {path}: its frames differ in size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))})")
    (width, height), = sizes
    return VideoSource(str(path), len(files), None, width, height)


def frame_files(path: str) -> list:
    """A folder's frames in name order (hidden files left out)."""
    return sorted((p for p in Path(path).iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def read_frames(source: VideoSource, indices) -> np.ndarray:
    """(n, H, W, 3) uint8 RGB: the source's frames at `indices` (in that order, a repeated index repeated),
    decoded once from the start."""
    indices = [int(i) for i in indices]
    wanted = set(indices)
    found = {}
    if source.is_folder:
        from .pictures import open_image

        files = frame_files(source.path)
        for i in sorted(wanted):
            found[i] = np.asarray(open_image(str(files[i])))
    else:
        import av

        with av.open(source.path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i > max(wanted):
                    break
                if i in wanted:
                    found[i] = frame.to_ndarray(format="rgb24")
    missing = sorted(wanted - set(found))
    if missing:
        raise UsageError(f"video {source.path}: frame {missing[0]} could not be decoded (the stream says it holds "
                         f"{source.frames} frames)")
    return np.stack([found[i] for i in indices])
