"""What the synthetic Product1M looks like: a made-up cosmetics catalogue, its pictures, and the
stand-in detector that turns picture regions into features (`synthetic.py` writes the files).

Products of a series share their colours and a brand its mark, so only a product's shape,
proportions and label details (and its title) tell instances apart: retrieval is real. Every
picture is a seeded function of (seed, split, row index), so builds are reproducible.
"""

from __future__ import annotations

import colorsys
import dataclasses
import random

import numpy as np
from PIL import Image, ImageDraw

from tfds_product1m import region_features

# ----------------------------------------------------------------------------- catalogue
# brand names are 2-3 of these syllables; the Latin spelling is their pinyin
SYLLABLES = list(zip("雅莉诗兰若花颜记悦黛芙清露美珂素姿蔻娜薇菲泉澜琪蕾婷欧缇萃肌",
                     "YA LI SHI LAN RUO HUA YAN JI YUE DAI FU QING LU MEI KE SU ZI KOU NA WEI FEI "
                     "QUAN LAN QI LEI TING OU TI CUI JI".split()))
SERIES = ["小黑瓶", "玻尿酸", "水光", "樱花", "雪肌", "烟酰胺", "胶原", "神经酰胺", "青春", "白金",
          "红石榴", "绿茶", "小棕瓶", "金致", "极光", "山茶花", "积雪草", "赋活", "光感", "柔润",
          "臻颜", "净透", "鎏金", "蓝铜"]
# product type -> (possible container shapes, size/unit words, short form used in set titles)
TYPES = {
    "精华": (("dropper", "bottle"), ("30ml", "50ml", "75ml"), "精华"),
    "面霜": (("jar",), ("50g", "30g"), "霜"), "爽肤水": (("bottle",), ("150ml", "200ml"), "水"),
    "乳液": (("bottle",), ("100ml", "120ml"), "乳"), "眼霜": (("jar", "tube"), ("15g", "20ml"), "眼霜"),
    "口红": (("tube",), ("3.5g", "3g"), "口红"), "粉底液": (("bottle", "dropper"), ("30ml",), "粉底"),
    "洁面乳": (("tube",), ("100g", "120g"), "洁面"), "防晒霜": (("tube",), ("40ml", "50ml"), "防晒"),
    "面膜": (("box",), ("5片", "10片装"), "面膜"), "香水": (("bottle",), ("50ml", "100ml"), "香水"),
    "卸妆水": (("bottle",), ("200ml", "400ml"), "卸妆水"), "气垫": (("compact",), ("15g", "12g*2"), "气垫"),
}
MARKETING = ["正品", "补水", "保湿", "官方旗舰店", "新品", "女", "滋润", "提亮", "淡纹", "修护", "清爽",
             "控油", "温和", "持久", "包邮", "限量版", "专柜正品", "国货", "敏感肌", "送女友", "学生",
             "正装", "紧致", "抗初老", "官方正品", "2023新款", "买一送一", "旗舰店"]
SET_WORDS = ["套装", "礼盒", "护肤品套装", "组合装", "套盒", "化妆品全套"]
COUNT_WORDS = {2: "两件套", 3: "三件套", 4: "四件套", 5: "五件套", 6: "六件套"}
# brand marks: ImageDraw calls in a unit box [-1, 1]^2 ("ring" is an outlined ellipse)
MARKS = {
    "circle": [("ellipse", (-1, -1, 1, 1))], "ring": [("ring", (-1, -1, 1, 1))],
    "triangle": [("polygon", (0, -1, 1, 1, -1, 1))],
    "diamond": [("polygon", (0, -1, 1, 0, 0, 1, -1, 0))],
    "square": [("rectangle", (-0.8, -0.8, 0.8, 0.8))],
    "cross": [("rectangle", (-1, -0.25, 1, 0.25)), ("rectangle", (-0.25, -1, 0.25, 1))],
    "stripes": [("rectangle", (-1.4, y, 1.4, y + 0.35)) for y in (-1, -0.2, 0.6)],
    "bars": [("rectangle", (x, -1, x + 0.35, 1)) for x in (-1, -0.2, 0.6)],
    "dots": [("ellipse", (-0.95, -0.35, -0.25, 0.35)), ("ellipse", (0.25, -0.35, 0.95, 0.35))],
}


# container drawings: (ImageDraw call, colour role, coordinates as fractions of the sprite's
# width (even positions) and height (odd)); then the label box, which carries the brand mark
SHAPES = {
    "bottle": ([("rectangle", "cap", (0.25, 0, 0.75, 0.18)), ("rounded", "body", (0, 0.24, 1, 1)),
                ("rectangle", "light", (0.35, 0.18, 0.65, 0.24)),
                ("rectangle", "light", (0.12, 0.28, 0.18, 0.95))], (0.26, 0.42, 0.86, 0.86)),
    "dropper": ([("ellipse", "cap", (0.3, 0, 0.7, 0.22)),
                 ("rounded", "body", (0.05, 0.28, 0.95, 1)),
                 ("rectangle", "cap", (0.2, 0.15, 0.8, 0.28))], (0.2, 0.45, 0.8, 0.88)),
    "jar": ([("rounded", "body", (0.05, 0.2, 0.95, 1)), ("rounded", "cap", (0, 0, 1, 0.3))],
            (0.15, 0.38, 0.85, 0.95)),
    "tube": ([("polygon", "body", (0, 0.06, 1, 0.06, 0.85, 0.8, 0.15, 0.8)),
              ("rectangle", "light", (0, 0, 1, 0.06)), ("rectangle", "cap", (0.2, 0.8, 0.8, 1))],
             (0.2, 0.2, 0.8, 0.7)),
    "box": ([("polygon", "light", (0, 0.15, 0.15, 0, 1, 0, 0.85, 0.15)),
             ("polygon", "cap", (0.85, 0.15, 1, 0, 1, 0.85, 0.85, 1)),
             ("rectangle", "body", (0, 0.15, 0.85, 1))], (0.1, 0.3, 0.75, 0.85)),
    "compact": ([("ellipse", "cap", (0, 0.1, 1, 1)), ("ellipse", "body", (0, 0, 1, 0.9)),
                 ("ellipse", "label", (0.2, 0.15, 0.8, 0.75))], (0.3, 0.2, 0.7, 0.7)),
}
RGB = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Product:
    """One instance of the catalogue: its label and its look (colours are shared per series)."""
    index: int
    brand: str
    brand_latin: str
    series: str
    kind: str  # product type word, e.g. 精华
    shape: str
    body: RGB
    cap: RGB
    label_rgb: RGB
    mark: str  # brand mark drawn on the label, a key of MARKS
    mark_rgb: RGB
    aspect: tuple[float, float]  # sprite (width, height) as fractions of the canonical height
    text_lines: tuple[float, ...]  # lengths of the fake text lines under the mark

    @property
    def label(self) -> str:
        return f"{self.brand} {self.series}{self.kind}"


def _colour(rnd: random.Random, value: tuple[float, float]) -> RGB:
    rgb = colorsys.hsv_to_rgb(rnd.random(), rnd.uniform(0.2, 0.9), rnd.uniform(*value))
    return tuple(int(255 * c) for c in rgb)


def _aspect(shape: str, rnd: random.Random) -> tuple[float, float]:
    u = rnd.uniform
    return {"bottle": (u(0.3, 0.5), u(0.85, 1.0)), "dropper": (u(0.26, 0.38), u(0.75, 0.95)),
            "jar": (u(0.7, 0.95), u(0.45, 0.6)), "tube": (u(0.2, 0.32), u(0.8, 1.0)),
            "box": (u(0.45, 0.7), u(0.6, 0.9)), "compact": (u(0.7, 0.85), u(0.5, 0.7))}[shape]


def make_catalogue(num_products: int, seed: int) -> list[Product]:
    """Brands (8-20, scaled with num_products), each with series of 2-5 products sharing a look."""
    rnd = random.Random(f"{seed}/catalogue")
    num_brands = min(num_products, max(8, min(20, num_products // 6)))
    brands: dict[str, str] = {}
    while len(brands) < num_brands:
        sy = rnd.sample(SYLLABLES, rnd.choice((2, 3, 3)))
        name, latin = "".join(c for c, _ in sy), "".join(p for _, p in sy)
        if name not in brands and latin not in brands.values():
            brands[name] = latin
    marks = {b: (list(MARKS)[i % len(MARKS)], _colour(rnd, (0.1, 0.6)))
             for i, b in enumerate(brands)}
    products: list[Product] = []
    for b, brand in enumerate(brands):
        count = num_products // num_brands + (b < num_products % num_brands)
        series_pool = rnd.sample(SERIES, len(SERIES))
        while count > 0:
            series = series_pool.pop()
            kinds = rnd.sample(list(TYPES), min(count, rnd.randint(2, 5)))
            body, cap = _colour(rnd, (0.35, 1.0)), _colour(rnd, (0.05, 0.95))
            label_rgb = _colour(rnd, (0.85, 1.0))
            for kind in kinds:
                shape = rnd.choice(TYPES[kind][0])
                lines = tuple(round(rnd.uniform(0.3, 1.0), 2) for _ in range(rnd.randint(1, 3)))
                products.append(Product(len(products), brand, brands[brand], series, kind, shape,
                                        body, cap, label_rgb, *marks[brand], _aspect(shape, rnd),
                                        lines))
            count -= len(kinds)
    return products


# ----------------------------------------------------------------------------- rendering
def _draw_mark(d: ImageDraw.ImageDraw, p: Product, box: tuple[float, ...]) -> None:
    """The brand mark and the product's fake text lines on its label."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    s = min(w, h * 0.55) / 2  # mark half-size, centred in the upper part of the label
    cx, cy, c = x0 + w / 2, y0 + h * 0.3, p.mark_rgb
    for call, unit in MARKS[p.mark]:
        xy = [(cx if k % 2 == 0 else cy) + s * v for k, v in enumerate(unit)]
        if call == "ring":
            d.ellipse(xy, outline=c, width=max(1, int(s / 3)))
        else:
            getattr(d, call)(xy, fill=c)
    for k, length in enumerate(p.text_lines):  # fake text: an instance-level cue
        y = y0 + h * (0.62 + 0.13 * k)
        d.rectangle((cx - w * 0.4 * length, y, cx + w * 0.4 * length, y + max(1, h * 0.05)), fill=c)


def _scaled(unit: tuple[float, ...], w: int, h: int) -> list[float]:
    """Unit coordinates (x, y, x, y, ...) to pixels of a w x h canvas."""
    return [v * (w - 1 if k % 2 == 0 else h - 1) for k, v in enumerate(unit)]


def render_sprite(p: Product, height: int) -> Image.Image:
    """The product alone on a transparent RGBA canvas, `height` px for an aspect height of 1."""
    w, h = max(8, int(p.aspect[0] * height)), max(8, int(p.aspect[1] * height))
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    colours = {"body": p.body, "cap": p.cap, "label": p.label_rgb,
               "light": tuple(min(255, v + 60) for v in p.body)}
    parts, box = SHAPES[p.shape]
    if p.shape != "compact":  # the compact's label is one of its parts
        parts = parts + [("rectangle", "label", box)]
    for call, role, unit in parts:
        xy = _scaled(unit, w, h)
        if call == "rounded":
            d.rounded_rectangle(xy, radius=min(w, h) * 0.12, fill=colours[role])
        else:
            getattr(d, call)(xy, fill=colours[role])
    _draw_mark(d, p, _scaled(box, w, h))
    return im


def make_backgrounds(size: int, seed: int, count: int = 8) -> list[Image.Image]:
    """A few backgrounds per seed (plain, gradient, noise texture, table), made once for speed."""
    rng = np.random.default_rng([seed, 7])
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    tiles = []
    for k in range(count):
        a, b = rng.uniform(120, 250, 3), rng.uniform(80, 250, 3)
        if k % 4 == 0:
            arr = np.broadcast_to(a, (size, size, 3))
        elif k % 4 == 1:
            arr = np.broadcast_to(a * (1 - ramp) + b * ramp, (size, size, 3))
        elif k % 4 == 2:
            coarse = Image.fromarray(rng.uniform(0, 255, (8, 8)).astype(np.uint8))
            low = np.asarray(coarse.resize((size, size), BILINEAR), np.float32)[..., None]
            arr = a * 0.8 + (low - 128) * 0.25 + rng.normal(0, 8, (size, size, 1))
        else:
            arr = np.where(ramp < rng.uniform(0.4, 0.7), a, b) + rng.normal(0, 5, (size, size, 1))
        tiles.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"))
    return tiles


_LEVELS = np.arange(256, dtype=np.float64)[None, :]
BILINEAR = Image.Resampling.BILINEAR


class Renderer:
    """Draws one picture of products (a list with repeats) with a caching of product sprites."""

    def __init__(self, catalogue: list[Product], size: int, seed: int):
        self.catalogue, self.size = catalogue, size
        self.backgrounds = make_backgrounds(size, seed)
        self._sprites: dict[int, Image.Image] = {}

    def sprite(self, index: int) -> Image.Image:
        if index not in self._sprites:
            # premultiplied alpha: resize and rotate then skip a conversion each
            sprite = render_sprite(self.catalogue[index], int(self.size * 0.9))
            self._sprites[index] = sprite.convert("RGBa")
        return self._sprites[index]

    def render(self, products: list[int], rnd: random.Random, transparent: bool = False,
               boxes: list | None = None) -> Image.Image:
        """Random background, position, scale, small rotation, overlap and lighting jitter.

        If `boxes` is a list, each drawn product's box (x1, y1, x2, y2 in pixels: the sprite's
        opaque extent, clipped to the image) is appended to it, in drawing order.
        """
        s, n = self.size, len(products)
        if transparent:
            im = Image.new("RGBA", (s, s), (0, 0, 0, 0))
        else:
            im = rnd.choice(self.backgrounds).transpose(rnd.choice(
                (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_180)))
        scale_max = 0.85 if n == 1 else 0.75 - 0.05 * n
        rows, placed = (1 if n <= 3 else 2), []  # 4+ products: a back row and a front row
        for j, idx in enumerate(products):
            cx = (j // rows + 0.5) / ((n + rows - 1) // rows) * s + rnd.uniform(-0.08, 0.08) * s
            bottom = s * (rnd.uniform(0.75, 0.97) - (0.25 if rows == 2 and j % 2 == 0 else 0))
            if n == 1:
                cx, bottom = rnd.uniform(0.35, 0.65) * s, rnd.uniform(0.8, 0.98) * s
            placed.append((bottom, cx, idx, rnd.uniform(0.55, 1) * scale_max, rnd.uniform(-12, 12)))
        for bottom, cx, idx, scale, angle in sorted(placed):  # back (higher up) first
            sp, f = self.sprite(idx), scale / 0.9  # sprites are drawn 0.9 * size high
            sp = sp.resize((max(4, int(sp.width * f)), max(4, int(sp.height * f))), BILINEAR)
            sp = sp.rotate(angle, BILINEAR, expand=True).convert("RGBA")
            x, y = int(cx - sp.width / 2), int(bottom - sp.height)
            im.paste(sp, (x, y), sp)
            opaque = sp.getchannel("A").getbbox()
            if boxes is not None and opaque:
                x1, y1 = max(0, x + opaque[0]), max(0, y + opaque[1])
                x2, y2 = min(s, x + opaque[2]), min(s, y + opaque[3])
                if x2 > x1 and y2 > y1:
                    boxes.append((x1, y1, x2, y2))
        c, b = rnd.uniform(0.8, 1.15), rnd.uniform(-25, 25)  # contrast, brightness, colour cast
        tint = np.array([rnd.uniform(-8, 8) for _ in range(3)])[:, None]
        lut = np.clip((_LEVELS - 128) * c + 128 + b + tint, 0, 255).astype(np.int64).ravel()
        return im.point(lut.tolist() + (list(range(256)) if transparent else []))


# ----------------------------------------------------------------------------- regions
class StandInDetector:
    """Stand-in for a frozen detector backbone: region feature = ReLU(crop @ W).

    crop = the region resized to 16 x 16 RGB, scaled to [-1, 1] and flattened (768 values); W is
    a fixed Gaussian [768, feature_dim] matrix seeded by the spec's seed (scaled by 1/sqrt(768)),
    so the same crop always gives the same feature and similar crops give nearby ones.
    """

    CROP = 16

    def __init__(self, feature_dim: int, seed: int):
        d_in = self.CROP * self.CROP * 3
        rng = np.random.default_rng([seed, 0x52454749])  # "REGI": apart from other seeded uses
        self.weights = (rng.standard_normal((d_in, feature_dim)) / np.sqrt(d_in)).astype(np.float32)

    def __call__(self, image: Image.Image, boxes: np.ndarray) -> np.ndarray:
        """float32 [n, feature_dim] for `boxes` [n, 4] (x1, y1, x2, y2 in pixels of `image`)."""
        if not len(boxes):
            return np.zeros((0, self.weights.shape[1]), np.float32)
        crops = np.stack([np.asarray(image.resize((self.CROP, self.CROP), BILINEAR,
                                                  box=tuple(float(v) for v in b)), np.float32)
                          for b in boxes])
        x = crops.reshape(len(boxes), -1) / 127.5 - 1.0
        return np.maximum(x @ self.weights, 0.0)


def region_boxes(products: list[tuple[int, int, int, int]], size: int, rnd: random.Random
                 ) -> np.ndarray:
    """The products' boxes plus 2-4 random distractor boxes, shuffled: float32 [n, 4]."""
    boxes = [tuple(map(float, b)) for b in products]
    for _ in range(rnd.randint(2, 4)):
        w, h = rnd.uniform(0.15, 0.6) * size, rnd.uniform(0.15, 0.6) * size
        x, y = rnd.uniform(0, size - w), rnd.uniform(0, size - h)
        boxes.append((x, y, x + w, y + h))
    rnd.shuffle(boxes)
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def region_line(row_id: str, image: Image.Image, product_boxes: list, detector: StandInDetector,
                rnd: random.Random, kind: str | None) -> str:
    """The TSV line of one picture; `kind` zero_boxes / bad_features makes it dirty on purpose."""
    if image.mode != "RGB":  # Transparent pictures (png_as_jpg) are seen on white, as built.
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    boxes = region_boxes(product_boxes, image.width, rnd)
    if kind == "zero_boxes":
        boxes = boxes[:0]
    line = region_features.encode_line(row_id, image.width, image.height, boxes,
                                       detector(image, boxes))
    if kind == "bad_features":  # Cut inside the features field: base64 of a wrong length.
        fields = line.rstrip("\n").split("\t")
        fields[-1] = fields[-1][: len(fields[-1]) // 2 + 1]
        line = "\t".join(fields) + "\n"
    return line
