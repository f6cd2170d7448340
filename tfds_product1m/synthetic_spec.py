"""What the synthetic Product1M generator writes: its spec and the dirty-row kinds it injects.

Kept apart from the generator (`synthetic.py`) so the TFDS builder can name its configs without
importing the renderer, and so `python -m tfds_product1m.synthetic` runs cleanly.
"""

from __future__ import annotations

import dataclasses

from tfds_product1m.product1m_files import SPLITS

ROW_QUIRKS = ("crlf", "png_as_jpg", "grayscale", "cmyk", "exif_rotated", "empty_title",
              "stray_spaces")  # on clean rows, which stay valid
EXTRA_LINES = ("blank_line", "short_row", "missing_image", "corrupt_image", "duplicate_id")
DIRTY_KINDS = ROW_QUIRKS + EXTRA_LINES
DROPPED_KINDS = ("short_row", "duplicate_id", "missing_image", "corrupt_image")
# With region features, per split (see synthetic.py): a clean row whose TSV line has zero boxes
# (kept), the corrupt_image row's line cut short (bad_regions), the missing_image row without a
# line (missing_regions). Both dropped rows are dropped by every build, so the examples stay equal.
REGION_DIRTY_KINDS = ("zero_boxes", "bad_features", "no_features")
MAX_PRODUCTS = 1000


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Rows per split are clean rows; dirty extras come on top."""
    num_products: int = 100
    num_train: int = 2000
    gallery_per_product: int = 6
    num_dev: int = 150
    num_test: int = 150
    image_size: int = 256
    seed: int = 0
    dirty: bool = True
    region_features: bool = False  # Also write bottom-up-attention style TSVs (stand-in features).
    feature_dim: int = 2048  # Width of those features.

    def split_rows(self, split: str) -> int:
        """Number of clean rows (all of them valid examples) in a split."""
        return {"train": self.num_train, "gallery": self.num_products * self.gallery_per_product,
                "dev": self.num_dev, "test": self.num_test}[split]

    def validate(self) -> None:
        """Raises ValueError with one sentence saying what is valid."""
        need = len(ROW_QUIRKS) + 1
        checks = [
            (2 <= self.num_products <= MAX_PRODUCTS,
             f"num_products must be 2..{MAX_PRODUCTS}, got {self.num_products}"),
            (self.num_train >= self.num_products, f"num_train must be >= num_products "
             f"({self.num_products}) so that every product appears in train, got {self.num_train}"),
            (min(self.gallery_per_product, self.num_dev, self.num_test) >= 1,
             "gallery_per_product, num_dev and num_test must be >= 1"),
            (32 <= self.image_size <= 1024, f"image_size must be 32..1024, got {self.image_size}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (1 <= self.feature_dim <= 8192, f"feature_dim must be 1..8192, got {self.feature_dim}"),
            (not self.dirty or min(self.split_rows(s) for s in SPLITS) >= need,
             f"with dirty rows every split needs >= {need} rows (add rows or use --no_dirty)")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message + ".")


TINY = SyntheticSpec(num_products=24, num_train=96, gallery_per_product=3, num_dev=16,
                     num_test=16, image_size=96)
REGIONS = SyntheticSpec(region_features=True)
# 24-d features: the width of the `tiny` model variant's region input.
TINY_REGIONS = dataclasses.replace(TINY, region_features=True, feature_dim=24)
