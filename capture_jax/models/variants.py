"""Model variants as data: one table of plain values, `model_config(name)` -> `config.model`.

- `paper`: the authors' released model (CAPTURE_SPEC.md), detector-region input; 148,192,136
  parameters.
- `paper_pixels`: the same sizes end to end from 224 px images cut into 16 px patches (196
  patches = regions), MAE-style pixel regression for MRM.
- `demo`: small enough to pretrain on the synthetic Product1M data in minutes on 2 CPU cores.
- `tiny`: for unit tests.

Fields (all variants have all of them, so any field can be overridden, e.g. `visual.kind`):
  vocab_size            text vocabulary (21128 = bert-base-chinese; demo/tiny use a vocabulary
                        learned from the synthetic titles, so override it to match)
  hidden_size           width of both streams and the joint encoder
  max_text_positions    rows of the text position table
  type_vocab_size       rows of the token type table (only type 0 is used)
  out_dim               width of the contrastive poolers and of the output projections
  dropout_rate          hidden dropout (embeddings, residual branches, joint input)
  attention_dropout_rate  dropout on attention probabilities in the streams and co-attention;
                        0 lets training use the fused attention kernels too
  layer_norm_eps, init_std
  dtype                 compute dtype ('float32' or 'bfloat16'); parameters are always float32
  attention_impl        jax.nn.dot_product_attention's implementation: 'auto' (JAX chooses;
                        XLA today), 'xla', or 'cudnn' (cuDNN fused attention: NVIDIA GPU and
                        bfloat16 only; applies where attention-probability dropout is off)
  mlm_max_predictions   0: MLM logits at every text position (the reference); K > 0: only at
                        the first K MLM-selected positions of each example (fewer FLOPs; a row's
                        selections past K are not scored; P(> 16 of 34 tokens at p = 0.15) ~ 2e-6)
  text.{num_layers, num_heads, mlp_dim, remat, length}   length = T, default text length
  visual.kind           'regions' (detector features) or 'pixels' (image patches)
  visual.{num_layers, num_heads, mlp_dim, remat}
  visual.feature_dim    region feature width (regions)
  visual.num_regions    R for regions (pixels: R = (image_size / patch_size)^2)
  visual.{image_size, patch_size}      pixels front end (the image must divide into patches)
  visual.{stem_channels, stem_stride}  optional conv stem (kernel = stride) before patching;
                        stem_channels = 0: a patch's feature is its raw pixels
  co.{num_layers, num_heads, width, remat}   co-attention (width = q/k/v width)
  joint.{num_layers, num_heads, mlp_dim, max_positions, remat}
  remat = rematerialise each layer of that stack in the backward pass (saves activation memory).
"""

import copy
from typing import Any

import ml_collections

_PAPER: dict[str, Any] = dict(
    vocab_size=21128,
    hidden_size=768,
    max_text_positions=512,
    type_vocab_size=2,
    out_dim=512,
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
    layer_norm_eps=1e-12,
    init_std=0.02,
    dtype="bfloat16",
    attention_impl="auto",
    mlm_max_predictions=0,
    text=dict(num_layers=4, num_heads=12, mlp_dim=3072, remat=False, length=36),
    visual=dict(
        kind="regions",
        num_layers=4,
        num_heads=8,
        mlp_dim=1024,
        remat=False,
        feature_dim=2048,
        num_regions=36,
        image_size=224,
        patch_size=16,
        stem_channels=0,
        stem_stride=4,
    ),
    co=dict(num_layers=4, num_heads=8, width=512, remat=False),
    joint=dict(num_layers=6, num_heads=8, mlp_dim=3072, max_positions=512, remat=False),
)


def _derive(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of `base` with top-level fields replaced and nested dicts updated key by key."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict):
            unknown = set(value) - set(out[key])
            assert not unknown, unknown
            out[key].update(value)
        else:
            assert key in out, key
            out[key] = value
    return out


VARIANTS: dict[str, dict[str, Any]] = {
    "paper": _PAPER,
    "paper_pixels": _derive(_PAPER, visual=dict(kind="pixels")),
    "demo": _derive(
        _PAPER,
        vocab_size=4096,
        hidden_size=128,
        out_dim=128,
        dropout_rate=0.0,  # 2,000 training pictures, 1,500 steps: dropout only slowed CLR down
        attention_dropout_rate=0.0,
        dtype="float32",
        text=dict(num_layers=2, num_heads=4, mlp_dim=512),
        visual=dict(
            kind="pixels", num_layers=2, num_heads=4, mlp_dim=256, image_size=96,
            patch_size=16, stem_channels=32, stem_stride=4,
        ),
        co=dict(num_layers=2, num_heads=4, width=128),
        joint=dict(num_layers=2, num_heads=4, mlp_dim=512),
    ),
    "tiny": _derive(
        _PAPER,
        vocab_size=128,
        hidden_size=32,
        max_text_positions=64,
        out_dim=16,
        dtype="float32",
        text=dict(num_layers=1, num_heads=2, mlp_dim=64, length=8),
        visual=dict(
            num_layers=1, num_heads=2, mlp_dim=48, feature_dim=24, num_regions=5,
            image_size=32, patch_size=8, stem_channels=0, stem_stride=2,
        ),
        co=dict(num_layers=1, num_heads=2, width=16),
        joint=dict(num_layers=1, num_heads=4, mlp_dim=64, max_positions=64),
    ),
}


def model_config(name: str) -> ml_collections.ConfigDict:
    """`config.model` for the variant `name` (a fresh, mutable ConfigDict)."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown model variant {name!r}; valid variants are {sorted(VARIANTS)}.")
    return ml_collections.ConfigDict(copy.deepcopy(VARIANTS[name]))
