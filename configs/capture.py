"""CAPTURE pretraining and evaluation configs: `get_config("paper" | "paper_pixels" | "demo" |
"demo_regions" | "tiny")`. Plain data: loading a config imports no TensorFlow, JAX or Orbax.

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

Variants (one table, `VARIANTS`; each row is what differs from `paper`, model sizes included):
`paper` is the reference (the authors' released model, 148,192,136 parameters, on detector regions
from `tfds_product1m/full_regions`, batch 64, 10 epochs); `paper_pixels` the same model end to end
from 224 px images cut into 16 px patches (196 patches = regions, MAE-style pixel regression for
MRM); `demo` a small pixels model that pretrains on the synthetic data in minutes on 2 CPU cores;
`demo_regions` the same small model on the synthetic stand-in region features; `tiny` the test
size. Every variant has every field, so any field can be overridden (e.g. `model.visual.kind`).
"""

import copy
from typing import Any

import ml_collections

_PRODUCT1M_TRAIN_ROWS = 1_132_830  # Rows of the real train split (`paper` runs 10 epochs).


def _paper() -> dict[str, Any]:
    """The `paper` config as plain values (a fresh copy); other variants change it (`VARIANTS`)."""
    return dict(
        variant="paper",  # Which row of VARIANTS this is (MFU uses the reference's count for paper).
        seed=0,  # Root of all randomness: init, shuffling, masking, dropout.
        # PRNG implementation of the dropout keys (jax.random.key impl): 'threefry2x32' (JAX's
        # default), 'rbg' or 'unsafe_rbg' (cheaper masks on GPUs; other random bits, same replay).
        rng_impl="threefry2x32",
        model=dict(
            # Text vocabulary (21128 = bert-base-chinese); set from the tokenizer at start-up.
            vocab_size=21128,
            hidden_size=768,  # Width of both streams and the joint encoder.
            max_text_positions=512,  # Rows of the text position table.
            type_vocab_size=2,  # Rows of the token type table (only type 0 is used).
            out_dim=512,  # Width of the contrastive poolers and of the output projections.
            dropout_rate=0.1,  # Hidden dropout (embeddings, residual branches, joint input).
            # Dropout on attention probabilities in the streams and co-attention; 0 lets
            # training use the fused attention kernels there too.
            attention_dropout_rate=0.1,
            layer_norm_eps=1e-12,  # LayerNorm epsilon, as in BERT.
            init_std=0.02,  # Standard deviation of the normal weight initialisation.
            dtype="bfloat16",  # Compute dtype ('float32' or 'bfloat16'); parameters are float32.
            # jax.nn.dot_product_attention's implementation: 'auto' (JAX chooses; XLA today),
            # 'xla', or 'cudnn' (NVIDIA GPU, bfloat16; where attention dropout is off).
            attention_impl="auto",
            # The word-embedding gradient (models/layers.py lookup): auto = a one-hot matmul
            # on GPU/TPU (a scatter-add serialises on repeated ids there), a scatter on CPU.
            embedding_grad="auto",
            # 0: MLM logits at every text position (the reference); K > 0: only at the first K
            # MLM-selected positions of a row (fewer FLOPs; later selections are not scored;
            # P(> 16 of 34 tokens at p = 0.15) ~ 2e-6).
            mlm_max_predictions=0,
            # Text stream; length = T, the default text length in tokens. remat (here and in
            # every stack): rematerialise each layer in the backward pass (saves memory).
            text=dict(num_layers=4, num_heads=12, mlp_dim=3072, remat=False, length=36),
            visual=dict(  # num_layers, num_heads, mlp_dim, remat: as for text.
                kind="regions",  # 'regions' (detector features) or 'pixels' (image patches).
                num_layers=4,
                num_heads=8,
                mlp_dim=1024,
                remat=False,
                feature_dim=2048,  # Region feature width (regions).
                num_regions=36,  # R for regions (pixels: R = (image_size / patch_size)^2).
                image_size=224,  # Pixels front end: the image must divide into patches.
                patch_size=16,  # Side of a square patch in pixels.
                # Optional conv stem (kernel = stride) before patching; 0: a patch's feature is
                # its raw pixels.
                stem_channels=0,
                stem_stride=4,  # The stem's kernel size and stride (it must divide patch_size).
            ),
            # Co-attention layers; width = their query/key/value width.
            co=dict(num_layers=4, num_heads=8, width=512, remat=False),
            # Joint encoder; max_positions = rows of its position table (text + regions).
            joint=dict(num_layers=6, num_heads=8, mlp_dim=3072, max_positions=512, remat=False),
        ),
        dataset=dict(
            name="tfds_product1m/full_regions",  # TFDS name/config; synthetic ones build on use.
            data_dir=ml_collections.FieldReference(None, field_type=str),  # None: TFDS default.
            train_split="train",  # The split trained on.
            shuffle_buffer=16_384,  # Examples per shuffle buffer.
            device_prefetch=2,  # Global batches put on the devices ahead (0: none).
        ),
        # A bert-base-chinese-style vocab.txt; None learns a WordPiece vocabulary of about
        # `vocab_size` from the train titles once and keeps it as workdir/vocab.txt.
        vocab_path=ml_collections.FieldReference(None, field_type=str),
        vocab_size=8000,  # Size of the learned vocabulary (when vocab_path is None).
        vocab_pad_multiple=8,  # Embedding rows padded to this multiple (tensor parallelism).
        masking=dict(
            mlm_prob=0.15,  # Share of real tokens selected for MLM (80/10/10 after).
            mrm_prob=0.15,  # Share of regions/patches selected for MRM (90% zeroed).
        ),
        loss=dict(  # The paper: every objective on, weight 1, temperature 0.07.
            use_mlm=True,  # Masked language modelling (cross-entropy on selected tokens).
            use_mrm=True,  # Masked region modelling (MSE on selected regions' features).
            use_clr=True,  # Contrastive InfoNCE between pre-fusion text and visual features.
            mlm_weight=1.0,  # Weights of the objectives in the summed loss.
            mrm_weight=1.0,
            clr_weight=1.0,
            clr_temperature=0.07,  # Fixed (not learned), as in the reference.
            # Steps at the start in which CLR alone is optimised (MLM/MRM computed and logged
            # with weight 0): from scratch, CLR leaves its ln(2B - 1) plateau only on its own.
            # 0 (the reference): every objective from step 0.
            clr_warmup_steps=0,
        ),
        optim=dict(  # The reference's AdamW; see capture_jax/optim.py.
            learning_rate=1e-4,  # Peak learning rate.
            warmup_fraction=0.1,  # Share of num_train_steps spent warming up linearly.
            b1=0.9,  # Adam's first-moment decay.
            b2=0.999,  # Adam's second-moment decay.
            eps=1e-6,  # Adam's epsilon.
            weight_decay=0.01,  # Decoupled; matrices and embeddings only.
            grad_clip_norm=1.0,  # Global norm over all parameters.
            grad_accum_steps=1,  # >1: accumulate this many micro-batches per update.
            bert_lr_multiplier=1.0,  # 0.1 = the reference's intended (never applied) BERT rate.
            # Parameter path prefixes that count as BERT-initialised for bert_lr_multiplier.
            bert_param_prefixes=("text_embeddings", "text_layers", "mlm_head"),
        ),
        global_batch_size=64,  # Across all devices and hosts.
        num_train_steps=10 * _PRODUCT1M_TRAIN_ROWS // 64,  # 10 epochs.
        # Stop (with a checkpoint) after this step although the schedule runs to num_train_steps,
        # e.g. to split a long run into jobs; -1 runs to the end.
        halt_after_step=-1,
        # Mesh axes (data, fsdp, model); -1 takes the remaining devices. Sharding rules preset:
        # dp (data parallel), fsdp, tp (tensor parallel), fsdp_tp; see capture_jax/sharding.py.
        mesh=dict(data=-1, fsdp=1, model=1),
        sharding_rules="dp",
        log_every=100,  # Steps between metric logs.
        log_mfu=True,  # Report MFU where the device's peak FLOP/s is known.
        checkpoint_every=2000,  # Steps between async saves.
        keep_checkpoints=3,  # Most recent checkpoints kept.
        # The checkpoint a run resumes from: -1 = the latest in the workdir; N = step N, e.g. the
        # one before a damaged latest step (the later step directories are then moved aside to
        # checkpoints/superseded-<step>-<time>, never deleted); 0 = start again from step 0.
        # Restarts of the same command resume from the latest step: the run records that it
        # went back to N already (`went_back_to` in each later checkpoint's meta).
        # --mode=evaluate evaluates step N.
        restore_step=-1,
        evals=dict(  # Name -> evaluator; each runs on its own schedule.
            retrieval=dict(
                # Module capture_jax.evaluators.<type>, or a dotted module path of your own.
                type="retrieval",
                # Steps between runs (and at the end); 0 = at the end only; -1 = never.
                every=10_000,
                batch_size=256,  # Examples per host per embedding batch.
                gallery_split="gallery",  # Split ranked for every query (one label per item).
                query_splits=("dev", "test"),  # Query splits; each gets its own files and scores.
                # Model features to rank with (keys of models.capture.FEATURE_KINDS).
                feature_kinds=("joint", "visual", "text", "clr_visual", "clr_text", "clr_concat",
                               "capture", "prefusion"),
                headline="joint",  # The kind the variant reports as its result (logged first).
                # Untrained baselines in the same evaluation (evaluators/baselines.py); the image
                # one must fit the front end: color_histogram for pixels, region_mean for regions.
                baselines=("tfidf", "region_mean"),
                top_k=100,  # Gallery ids written per query (the official scores use up to 100).
                query_chunk=1024,  # Queries ranked at once; memory = query_chunk x gallery_tile.
                gallery_tile=32768,  # Gallery rows per device scored at once.
                # Exact top-k method (evaluators/ranker.py): auto (faiss on CPUs, exact on GPUs and
                # TPUs), exact (float32 on the devices), faiss (on the host), screen (bfloat16
                # screen + float32 rescore on the devices).
                ranker="auto",
                screen_candidates=256,  # Per query, rescored in float32 (screen).
                report_queries=20,  # Queries shown in each report.html (evenly spaced sample).
            ),
        ),
        profile=False,  # Capture a 5-step profile into the workdir.
        # Weights-only starts, used when the workdir has no checkpoint yet.
        init_from=dict(
            # A previous run's workdir, or a directory from `python -m capture_jax.convert`.
            checkpoint="",
            # A local Hugging Face BERT directory (bert-base-chinese: config.json, vocab.txt,
            # model.safetensors or pytorch_model.bin): text embeddings, layers 0..3 and the MLM
            # head are loaded from it and its vocab.txt becomes the tokenizer vocabulary.
            bert="",
        ),
    )


def _changed(base: dict[str, Any], changes: dict[str, Any], where: str = "") -> dict[str, Any]:
    """A copy of `base` with `changes` applied, nested dicts key by key; unknown keys fail."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if key not in out:
            raise KeyError(f"Variant field {where}{key} is not a field of the config it changes.")
        if isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _changed(out[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


_PIXELS_BASELINES = ("tfidf", "color_histogram")  # The untrained baselines of a pixels model.

# The small pixels model on the synthetic Product1M (a few minutes on 2 CPU cores).
_DEMO = dict(
    model=dict(
        vocab_size=4096,
        hidden_size=128,
        out_dim=128,
        dropout_rate=0.0,  # Off: on 2,000 training pictures it only slowed CLR down.
        attention_dropout_rate=0.0,
        dtype="float32",  # CPU.
        text=dict(num_layers=2, num_heads=4, mlp_dim=512),
        visual=dict(kind="pixels", num_layers=2, num_heads=4, mlp_dim=256, image_size=96,
                    patch_size=16, stem_channels=32, stem_stride=4),
        co=dict(num_layers=2, num_heads=4, width=128),
        joint=dict(num_layers=2, num_heads=4, mlp_dim=512),
    ),
    dataset=dict(name="tfds_product1m/synthetic"),
    global_batch_size=32,
    num_train_steps=2500,  # How far CLR gets decides the score (docs/retrieval.md).
    optim=dict(learning_rate=1e-3),
    # From scratch (no BERT): CLR alone first; MLM weight 2, since the titles carry most of
    # the signal and MLM trains the token embeddings that `prefusion` reads; no MRM, since
    # regressing normalised pixels kept the visual features near chance.
    loss=dict(clr_warmup_steps=600, mlm_weight=2.0, mrm_weight=0.0),
    log_every=50,
    checkpoint_every=500,
    evals=dict(retrieval=dict(every=0, batch_size=64, headline="prefusion",
                              baselines=_PIXELS_BASELINES)),
)

# Each row: what differs from `paper` (nested dicts change nested fields key by key).
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {},
    "paper_pixels": dict(
        model=dict(visual=dict(kind="pixels")),
        dataset=dict(name="tfds_product1m/full"),
        evals=dict(retrieval=dict(baselines=_PIXELS_BASELINES)),
    ),
    "demo": _DEMO,
    # `demo` on detector-style region features (the synthetic stand-in TSVs, 2048-d like the
    # reference) with the reference's objective weights, since MRM on features is what it trains.
    "demo_regions": _changed(_DEMO, dict(
        model=dict(visual=dict(kind="regions")),
        dataset=dict(name="tfds_product1m/synthetic_regions"),
        loss=dict(mlm_weight=1.0, mrm_weight=1.0),
        evals=dict(retrieval=dict(headline="joint", baselines=("tfidf", "region_mean"))),
    )),
    "tiny": dict(
        model=dict(
            vocab_size=128,
            hidden_size=32,
            max_text_positions=64,
            out_dim=16,
            dtype="float32",
            text=dict(num_layers=1, num_heads=2, mlp_dim=64, length=8),
            visual=dict(kind="pixels", num_layers=1, num_heads=2, mlp_dim=48, feature_dim=24,
                        num_regions=5, image_size=32, patch_size=8, stem_channels=0,
                        stem_stride=2),
            co=dict(num_layers=1, num_heads=2, width=16),
            joint=dict(num_layers=1, num_heads=4, mlp_dim=64, max_positions=64),
        ),
        dataset=dict(name="tfds_product1m/synthetic_tiny", shuffle_buffer=64),
        vocab_size=256,
        global_batch_size=8,
        num_train_steps=6,
        log_every=2,
        checkpoint_every=3,
        evals=dict(retrieval=dict(every=0, batch_size=16, baselines=_PIXELS_BASELINES)),
    ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of variant `arg` (default `paper`)."""
    name = arg or "paper"
    if name not in VARIANTS:
        raise ValueError(f"Unknown config variant {name!r}; choose one of {sorted(VARIANTS)}.")
    return ml_collections.ConfigDict(_changed(_paper(), dict(VARIANTS[name], variant=name)))
