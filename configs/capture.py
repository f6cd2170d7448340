"""CAPTURE pretraining and evaluation configs: `get_config("paper" | "paper_pixels" | "demo" |
"demo_regions" | "tiny")`.

  # The synthetic Product1M, built on first use; a few minutes on 2 CPU cores:
  python main.py --config configs/capture.py:demo --workdir /tmp/capture_demo
  # The same on detector region features (synthetic stand-in TSVs), no download:
  python main.py --config configs/capture.py:demo_regions --workdir /tmp/capture_demo_regions
  # The paper's sizes on the real Product1M (build it first, see README), from region
  # features (full_regions) or from pixels (full):
  python main.py --config configs/capture.py:paper --workdir DIR
  python main.py --config configs/capture.py:paper_pixels --workdir DIR
  # Any field can be overridden:
  python main.py --config configs/capture.py:demo --workdir DIR \\
      --config.num_train_steps=300 --config.optim.learning_rate=3e-4 --config.mesh.model=2

Variants (one table, `_VARIANTS`): `paper` is the reference (detector regions from
`tfds_product1m/full_regions`, batch 64, 10 epochs); `paper_pixels` the same model end to end
from 224 px images; `demo` a small pixels model on the synthetic data; `demo_regions` the same
small model on the synthetic stand-in region features; `tiny` the test size. Model sizes live in
`capture_jax/models/variants.py`.
"""

import ml_collections

from capture_jax import losses, optim
from capture_jax.evaluators import retrieval
from capture_jax.models import variants

_PRODUCT1M_TRAIN_ROWS = 1_132_830

# Per variant: the model variant and what differs from the defaults in `get_config`.
_VARIANTS = {
    "paper": dict(
        model="paper", dataset="tfds_product1m/full_regions", global_batch_size=64,
        num_train_steps=10 * _PRODUCT1M_TRAIN_ROWS // 64),
    "paper_pixels": dict(
        model="paper_pixels", dataset="tfds_product1m/full", global_batch_size=64,
        num_train_steps=10 * _PRODUCT1M_TRAIN_ROWS // 64),
    # From scratch (no BERT), CLR alone for the first 600 steps: with MLM/MRM from step 0 it
    # stays on its ln(2B - 1) plateau and the joint features do not learn. MRM weight 0: on
    # pixels it regresses normalised pixels, which kept the visual features near chance. MLM
    # weight 2 and the `prefusion` headline: the titles carry most of the signal, and MLM is
    # what trains the token embeddings that feature reads. 2,500 steps: how far CLR gets decides
    # the score (docs/retrieval.md); it fits in about 12 minutes on 2 CPU cores.
    "demo": dict(
        model="demo", dataset="tfds_product1m/synthetic", global_batch_size=32,
        num_train_steps=2500, learning_rate=1e-3, clr_warmup_steps=600, mlm_weight=2.0,
        mrm_weight=0.0, log_every=50, checkpoint_every=500, eval_every=0, eval_batch_size=64,
        headline="prefusion"),
    "tiny": dict(
        model="tiny", visual_kind="pixels", dataset="tfds_product1m/synthetic_tiny",
        global_batch_size=8, num_train_steps=6, log_every=2, checkpoint_every=3, eval_every=0,
        eval_batch_size=16, vocab_size=256, shuffle_buffer=64),
}
# `demo` on detector-style region features (the synthetic stand-in TSVs, 2048-d like the
# reference), everything else as in `demo` but the reference's objective weights (MRM on
# features is what the reference trains): the two retrieval scores compare the front ends, each
# under the objective weights that suit it. Its headline stays `joint` (the kind it was
# measured with).
_VARIANTS["demo_regions"] = dict(_VARIANTS["demo"], visual_kind="regions", mlm_weight=1.0,
                                 mrm_weight=1.0, dataset="tfds_product1m/synthetic_regions",
                                 headline="joint")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of variant `arg` (default `paper`)."""
    name = arg or "paper"
    if name not in _VARIANTS:
        raise ValueError(f"Unknown config variant {name!r}; choose one of {sorted(_VARIANTS)}.")
    v = _VARIANTS[name]
    config = ml_collections.ConfigDict()
    config.variant = name  # Which row of _VARIANTS this is (MFU uses the spec's count for paper).
    config.seed = 0  # Root of all randomness: init, shuffling, masking, dropout.

    config.model = variants.model_config(v["model"])  # Model sizes; see models/variants.py.
    if "visual_kind" in v:
        config.model.visual.kind = v["visual_kind"]

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = v["dataset"]  # TFDS name/config; synthetic ones are built on first use.
    config.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: TFDS default.
    config.dataset.train_split = "train"
    config.dataset.shuffle_buffer = v.get("shuffle_buffer", 16_384)  # Examples per shuffle buffer.
    config.dataset.device_prefetch = 2  # Global batches put on the devices ahead (0: none).

    # A bert-base-chinese-style vocab.txt; None learns a WordPiece vocabulary of about
    # `vocab_size` from the train titles once and keeps it as workdir/vocab.txt.
    config.vocab_path = ml_collections.FieldReference(None, field_type=str)
    config.vocab_size = v.get("vocab_size", 8000)
    config.vocab_pad_multiple = 8  # Embedding rows padded to this multiple (tensor parallelism).

    config.masking = ml_collections.ConfigDict()
    config.masking.mlm_prob = 0.15  # Share of real tokens selected for MLM (80/10/10 after).
    config.masking.mrm_prob = 0.15  # Share of regions/patches selected for MRM (90% zeroed).

    config.loss = losses.loss_config()  # Which objectives, their weights, CLR temperature.
    for name in ("clr_warmup_steps", "mlm_weight", "mrm_weight"):  # The variant's, if it sets them.
        config.loss[name] = v.get(name, config.loss[name])
    config.optim = optim.default_optim_config()  # AdamW, schedule, clipping, accumulation.
    if "learning_rate" in v:
        config.optim.learning_rate = v["learning_rate"]

    config.global_batch_size = v["global_batch_size"]  # Across all devices and hosts.
    config.eval_batch_size = v.get("eval_batch_size", 256)  # Per host, for embedding.
    config.num_train_steps = v["num_train_steps"]
    # Stop (with a checkpoint) after this step although the schedule runs to num_train_steps,
    # e.g. to split a long run into jobs; -1 runs to the end.
    config.halt_after_step = -1

    # Mesh axes (data, fsdp, model); -1 takes the remaining devices. Sharding rules preset:
    # dp (data parallel), fsdp, tp (tensor parallel), fsdp_tp; see capture_jax/sharding.py.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    config.sharding_rules = "dp"

    config.log_every = v.get("log_every", 100)  # Steps between metric logs.
    config.log_mfu = True  # Report MFU where the device's peak FLOP/s is known.
    config.checkpoint_every = v.get("checkpoint_every", 2000)  # Steps between async saves.
    config.keep_checkpoints = 3  # Most recent checkpoints kept.
    # Steps between retrieval evaluations (and at the end); 0 = at the end only; -1 = never.
    config.eval_every = v.get("eval_every", 10_000)
    config.eval = retrieval.eval_config()  # Splits, feature kinds, top-k, chunking, report size.
    config.eval.headline = v.get("headline", "joint")  # The kind the variant reports.
    if config.model.visual.kind == "regions":  # The untrained image baseline of the front end.
        config.eval.baselines = ("tfidf", "region_mean")
    config.profile = False  # Capture a 5-step profile into the workdir.

    # Weights-only starts, used when the workdir has no checkpoint yet. `checkpoint`: a previous
    # run's workdir, or a directory from `python -m capture_jax.convert`.
    config.init_from = ml_collections.ConfigDict()
    config.init_from.checkpoint = ""
    # A local Hugging Face BERT directory (bert-base-chinese: config.json, vocab.txt,
    # model.safetensors or pytorch_model.bin): text embeddings, layers 0..3 and the MLM head
    # are loaded from it and its vocab.txt becomes the tokenizer vocabulary. See README.
    config.init_from.bert = ""
    return config
