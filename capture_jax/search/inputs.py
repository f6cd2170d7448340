"""A query's picture, title and boxes: checked (each mistake one `QueryError` sentence) and made
into model rows as the input pipeline makes a built example into one.

The picture goes through the dataset builder's own clean-up (`product1m_files.clean_image`:
upright RGB JPEG, longer side at most the index's `max_image_side`), then TensorFlow's JPEG
decoder and `resize_with_pad` (`visual_inputs.decode_image`) and the ImageNet normalisation: a
picture of the built dataset gives bit for bit the pixels the evaluator embedded. A box is cut
from the cleaned picture (its corners scaled with it) and resized like a whole picture; each box
is one row. The TensorFlow ops run as graphs traced once (eagerly they cost 2-4x more);
the normalisation runs in numpy, whose float32 steps equal tf.data's (a traced graph's
arithmetic rewrites do not: they move the last bit).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import re

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from capture_jax import visual_inputs
from tfds_product1m import product1m_files

MAX_IMAGE_BYTES = 20 << 20  # An upload larger than this is refused before it is decoded.
MAX_PIXELS = 40_000_000  # Width x height; larger pictures are refused before they are decoded.
MAX_TITLE_CHARS = 300  # Product1M's titles have at most about 100.
MAX_BOXES = 16


class QueryError(ValueError):
    """A bad query (picture, title, boxes, options): one sentence for the person who sent it."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status  # The HTTP status the server answers with.


@dataclasses.dataclass(frozen=True)
class Picture:
    """A checked picture: its cleaned JPEG and the size a person sees (EXIF rotation applied)."""

    jpeg: bytes
    width: int
    height: int
    scale: float  # Pixels of `jpeg` per pixel of the picture as seen (<= 1).


def read_picture(data: bytes, max_side: int) -> Picture:
    """Checks an uploaded picture and cleans it as the dataset builder cleans its images."""
    if not data:
        raise QueryError("The picture is empty: choose a JPEG or PNG file of the product.")
    if len(data) > MAX_IMAGE_BYTES:
        raise QueryError(f"The picture is {len(data) / 2**20:.1f} MiB, over the limit of "
                         f"{MAX_IMAGE_BYTES >> 20} MiB: send a smaller file.", 413)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise QueryError("The picture has too many pixels to decode safely: scale it down "
                         f"to at most {MAX_PIXELS // 10**6} megapixels.", 413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise QueryError("The upload is not a picture that can be read (JPEG, PNG, GIF, BMP or "
                         "WebP): choose a photo of the product.") from None
    if width * height > MAX_PIXELS:
        raise QueryError(f"The picture is {width}x{height} ({width * height / 1e6:.0f} "
                         f"megapixels), over the limit of {MAX_PIXELS // 10**6}: scale it down.",
                         413)
    try:
        clean = product1m_files.clean_image(data, max_side)
    except product1m_files.BadImageError:
        raise QueryError("The picture cannot be decoded completely (the file is truncated or "
                         "damaged): send it again or choose another.") from None
    with Image.open(io.BytesIO(clean.jpeg)) as image:
        scale = image.size[0] / clean.width
    return Picture(clean.jpeg, clean.width, clean.height, scale)


def check_title(title: str | None) -> str:
    """The title, stripped; one sentence if it is empty or very long."""
    title = (title or "").strip()
    if not title:
        raise QueryError("The title is empty: type the product's title (a few words).")
    if len(title) > MAX_TITLE_CHARS:
        raise QueryError(f"The title has {len(title)} characters, over the limit of "
                         f"{MAX_TITLE_CHARS}: give the product's title only.")
    return title


_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(",".join([_NUMBER] * 4))


def parse_boxes(text: str | None) -> list[tuple[float, float, float, float]]:
    """`x1,y1,x2,y2;x1,y1,x2,y2;...` (pixel corners of the picture as seen) -> boxes."""
    if text is None or not text.strip():
        return []
    parts = [p for p in text.split(";") if p.strip()]
    if len(parts) > MAX_BOXES:
        raise QueryError(f"{len(parts)} boxes is more than {MAX_BOXES}: send the products' "
                         "boxes only.")
    boxes = []
    for i, part in enumerate(parts, 1):
        match = _BOX.fullmatch(part)
        if not match:
            raise QueryError(f"Box {i} ({part.strip()!r}) is not four numbers x1,y1,x2,y2: "
                             "write boxes as x1,y1,x2,y2;x1,y1,x2,y2 in pixels.")
        boxes.append(tuple(float(v) for v in match.groups()))
    return boxes


def check_boxes(boxes, picture: Picture) -> None:
    """One sentence for the first box that is empty or not inside the picture."""
    w, h = picture.width, picture.height
    for i, (x1, y1, x2, y2) in enumerate(boxes, 1):
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            raise QueryError(f"Box {i} ({x1:g},{y1:g},{x2:g},{y2:g}) is not inside the {w}x{h} "
                             "picture (or is empty): give pixel corners x1 < x2 <= width, "
                             "y1 < y2 <= height.")


@functools.cache
def _image_graphs(size: int):
    """(whole, crop): a JPEG -> float32 [size, size, 3] in 0..255, and a decoded picture's
    crop (top, left, bottom, right) -> the same, as graphs traced once per size."""
    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def whole(jpeg):
        return visual_inputs.decode_image(jpeg, size)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8),
                                  tf.TensorSpec([4], tf.int32)])
    def crop(decoded, box):
        top, left, bottom, right = tf.unstack(box)
        return tf.image.resize_with_pad(decoded[top:bottom, left:right], size, size,
                                        antialias=True)

    return whole, crop


_MEAN = np.asarray(visual_inputs.IMAGENET_MEAN, np.float32)
_STD = np.asarray(visual_inputs.IMAGENET_STD, np.float32)


def normalize(images: np.ndarray) -> np.ndarray:
    """`visual_inputs.normalize_images` in numpy float32, equal to it bit for bit."""
    return (images / np.float32(255.0) - _MEAN) / _STD


def pixel_rows(picture: Picture, boxes, image_size: int) -> np.ndarray:
    """float32 [rows, S, S, 3], normalised: the whole picture, or one row per box."""
    whole, crop = _image_graphs(image_size)
    if not boxes:
        images = [whole(picture.jpeg).numpy()]
    else:
        decoded = tf.io.decode_jpeg(picture.jpeg, channels=3)
        height, width = int(decoded.shape[0]), int(decoded.shape[1])
        images = []
        for x1, y1, x2, y2 in boxes:
            s = picture.scale
            left, top = min(int(x1 * s), width - 1), min(int(y1 * s), height - 1)
            right = max(min(int(np.ceil(x2 * s)), width), left + 1)
            bottom = max(min(int(np.ceil(y2 * s)), height), top + 1)
            images.append(crop(decoded, np.array([top, left, bottom, right], np.int32)).numpy())
    return normalize(np.stack(images))


def text_rows(tokenizer, title: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int32 [n, T]: the title tokenised as in the input pipeline, n times."""
    ids, mask = tokenizer.encode_titles([title])
    return np.repeat(ids, n, 0), np.repeat(mask, n, 0)
