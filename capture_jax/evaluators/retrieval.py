"""Retrieval evaluation: embed gallery and queries, rank, score by the official rules, write.

For every query split (dev, test) and every feature kind (`config.eval.feature_kinds`, described
in `models.capture.FEATURE_KINDS`) and untrained baseline (`config.eval.baselines`, see
`baselines.py`), process 0 writes under `workdir/retrieval/<split>/<kind>/`:
`retrieval_id_list.txt` (official format, `qid,g0,...,g99`), `metric_results.json` (the official
scores as fractions, as the authors' script writes them) and `report.html`; and
`workdir/retrieval/index.html`, the table of all of them. Every process embeds and ranks
(collectives); ranking is `ranker.top_k`.

Scores use the official ground truth kept with the built dataset (its metadata `ground_truth`:
every row of the gallery/dev/test text files read by the official rules, also rows the build
skipped for a missing image), so they equal `python -m capture_jax.metrics` run on the written
`retrieval_id_list.txt` with the official text files, and positives whose rows were never built
count as misses, as they do for the official script.
"""

import collections
import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from capture_jax import input_pipeline, metrics, sharding
from capture_jax.evaluators import baselines, ranker, report
from capture_jax.models import capture


def eval_config() -> ml_collections.ConfigDict:
    """Defaults of `config.eval`."""
    return ml_collections.ConfigDict(dict(
        gallery_split="gallery",  # split ranked for every query (one label per item)
        query_splits=("dev", "test"),  # query splits; each gets its own files and scores
        # Model features to rank with (keys of models.capture.FEATURE_KINDS).
        feature_kinds=tuple(capture.FEATURE_KINDS),
        headline="joint",  # the kind a variant reports as its result (logged first, marked)
        # Untrained baselines in the same evaluation (baselines.BASELINES); the image one must
        # fit the front end: color_histogram for pixels, region_mean for regions.
        baselines=("tfidf", "color_histogram"),
        top_k=100,  # gallery ids written per query (the official scores use up to 100)
        query_chunk=1024,  # queries ranked at once; memory = query_chunk x gallery_tile floats
        gallery_tile=32768,  # gallery rows per device scored at once
        report_queries=20,  # queries shown in each report.html (evenly spaced sample)
    ))


def check_eval_config(config: ml_collections.ConfigDict) -> None:
    """One sentence for a feature kind, headline or baseline the evaluation cannot produce."""
    ec = config.eval
    unknown = [k for k in ec.feature_kinds if k not in capture.FEATURE_KINDS]
    if unknown:
        raise ValueError(f"Unknown feature kinds {unknown} in config.eval.feature_kinds; choose "
                         f"from {list(capture.FEATURE_KINDS)}.")
    baselines.check(ec.baselines, config.model.visual.kind)
    if ec.headline not in (*ec.feature_kinds, *ec.baselines):
        raise ValueError(f"config.eval.headline={ec.headline!r} is not among the evaluated kinds "
                         f"{[*ec.feature_kinds, *ec.baselines]}: add it to feature_kinds.")


# ---------------------------------------------------------------------------------- embedding
_EMBEDDERS = {}


def _embedder(graphdef, model_state, mesh, rules, image_baselines: tuple[str, ...]):
    """Jitted (state, batch) -> (features dict, valid, row), all batch-sharded; cached. The
    features are the model's kinds and the image baselines'."""
    key = (graphdef, mesh, rules, image_baselines)
    if key not in _EMBEDDERS:
        def embed(state, batch):
            features = nnx.merge(graphdef, state).embed(batch)
            features.update(baselines.image_features(batch, image_baselines,
                                                     input_pipeline.IMAGENET_MEAN,
                                                     input_pipeline.IMAGENET_STD))
            return features, batch["valid"], batch["row"]
        batch_sh = sharding.batch_sharding(mesh, rules)
        _EMBEDDERS[key] = jax.jit(
            embed, in_shardings=(sharding.state_shardings(model_state, mesh, rules), batch_sh),
            out_shardings=batch_sh)
    return _EMBEDDERS[key]


def _allgather_strings(strings: list[str]) -> list[str]:
    """Every process's list, concatenated in process order, on every process."""
    if jax.process_count() == 1:
        return strings
    data = [s.encode() for s in strings]
    width = int(multihost_utils.process_allgather(np.int32(max(map(len, data), default=1))).max())
    buf = np.zeros((len(data), width), np.uint8)
    for row, d in zip(buf, data):
        row[:len(d)] = np.frombuffer(d, np.uint8)
    return [bytes(r).rstrip(b"\0").decode() for r in
            multihost_utils.process_allgather(buf, tiled=True)]


@dataclasses.dataclass
class Embedded:
    """One split's valid rows in dataset order, on every process."""

    features: dict[str, np.ndarray]  # kind -> [N, D]: model kinds and image baselines
    ids: list[str]
    labels: list[list[str]]  # as built (the scores use the official ground truth instead)
    titles: list[str]


def embed_split(config, workdir: str, graphdef, model_state, mesh, rules, split: str) -> Embedded:
    """Features, ids, labels and titles of `split`'s valid rows, in dataset order."""
    ds = input_pipeline.create_eval_dataset(config, workdir, split)
    batch_sh = sharding.batch_sharding(mesh, rules)
    rows_per_host = len(ds) * ds.batch_size
    image_baselines = tuple(b for b in config.eval.baselines if b in baselines.IMAGE_BASELINES)
    outputs, records = [], []
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        embed = _embedder(graphdef, model_state, mesh, rules, image_baselines)
        for b, (batch, item_ids, labels, titles) in enumerate(ds):
            start = jax.process_index() * rows_per_host + b * ds.batch_size
            batch["row"] = np.arange(start, start + len(item_ids), dtype=np.int32)
            outputs.append(embed(model_state, input_pipeline.make_global_batch(batch, batch_sh)))
            records += [json.dumps([i, ls, t], ensure_ascii=False)
                        for i, ls, t in zip(item_ids, labels, titles)]
    features, valid, row = jax.tree.map(lambda *xs: np.concatenate(xs),
                                        *multihost_utils.process_allgather(outputs, tiled=True))
    records = [json.loads(r) for r in _allgather_strings(records)]
    order = np.argsort(row, kind="stable")
    keep = order[valid[order] == 1]
    features = {kind: np.asarray(f[keep], np.float32) for kind, f in features.items()}
    for kind, f in features.items():
        if not np.isfinite(f).all():
            raise FloatingPointError(f"The model gives non-finite {kind} features on {split}: "
                                     "the checkpoint or the training run diverged.")
    records = [records[r] for r in row[keep]]
    return Embedded(features, *(list(column) for column in zip(*records))) if records else \
        Embedded(features, [], [], [])


# ------------------------------------------------------------------------------ ground truth
@dataclasses.dataclass
class GroundTruth:
    """The official labels of every gallery/query row of the text files (not only those built)."""

    gallery: dict[str, str]  # gallery id -> its (first) label
    queries: dict[str, dict[str, tuple[str, ...]]]  # split -> query id -> labels
    warnings: list[str]


def load_ground_truth(config) -> GroundTruth:
    """The ground truth stored with the built dataset (see the builder's `ground_truth`)."""
    builder = input_pipeline.get_builder(config)
    stored = builder.info.metadata.get("ground_truth")
    ec = config.eval
    if stored is None:
        raise ValueError(
            f"Dataset {builder.info.full_name} in {builder.data_dir} was built without the "
            "official ground truth (tfds_product1m < 1.1.0): rebuild it with this version "
            "(tfds build tfds_product1m --config=... --data_dir=...) and evaluate again.")
    missing = [s for s in (ec.gallery_split, *ec.query_splits) if s not in stored]
    if missing:
        raise ValueError(f"Dataset {builder.info.full_name} has no ground truth for splits "
                         f"{missing} (its text files were absent at build time): build them or "
                         "set config.eval.query_splits.")
    from tfds_product1m import product1m_files  # noqa: F401  (registered with the builder)

    warnings = []
    for split in (ec.gallery_split, *ec.query_splits):
        table = dataclasses.replace(product1m_files.OfficialLabels({}, [], 0, 0),
                                    **{k: v for k, v in stored[split].items() if k != "labels"})
        warnings += metrics.ground_truth_warnings(f"{split} text file", table)
    gallery = {gid: labels[0] for gid, labels in stored[ec.gallery_split]["labels"].items()}
    queries = {s: {q: tuple(ls) for q, ls in stored[s]["labels"].items()} for s in ec.query_splits}
    return GroundTruth(gallery, queries, warnings)


def unreachable_note(split: str, gt: GroundTruth, built_gallery: set[str]) -> str:
    """How many (query, positive) pairs point at gallery rows the build skipped."""
    skipped = [g for g in gt.gallery if g not in built_gallery]
    by_label = collections.Counter(gt.gallery[g] for g in skipped)
    counts = collections.Counter(gt.gallery.values())
    pairs = total = 0
    for labels in gt.queries[split].values():
        distinct = set(labels)
        pairs += sum(by_label[label] for label in distinct)
        total += sum(counts[label] for label in distinct)
    return (f"{split}: {len(skipped)} of the {len(gt.gallery)} gallery rows of the text file are "
            f"not in the built gallery (skipped at build time); {pairs} of the {total} (query, "
            f"gallery positive) pairs of the {len(gt.queries[split])} {split} queries point at "
            "them, so no ranking can retrieve those positives.")


# ----------------------------------------------------------------------------------- evaluate
def evaluate(config, workdir: str, graphdef, model_state, mesh, rules, *, step: int,
             run_info: dict | None = None) -> list[tuple[str, float]]:
    """Embeds, ranks, scores and writes every query split x (feature kind, baseline).

    Returns `(name, value)` pairs for the trainer to write: `retrieval/<split>/<kind>/mAP@10`
    etc. in percent. The official fractions go to the files.
    """
    ec = config.eval
    check_eval_config(config)
    gt = load_ground_truth(config)
    gallery = embed_split(config, workdir, graphdef, model_state, mesh, rules, ec.gallery_split)
    g_ids = np.asarray(gallery.ids)
    kinds = (*ec.feature_kinds, *ec.baselines)
    tfidf = baselines.TfIdf(gallery.titles) if "tfidf" in ec.baselines else None
    results, main = {}, jax.process_index() == 0
    notes = list(gt.warnings)
    for split in ec.query_splits:
        queries = embed_split(config, workdir, graphdef, model_state, mesh, rules, split)
        labels = [gt.queries[split].get(q) for q in queries.ids]
        notes.append(unreachable_note(split, gt, set(gallery.ids)))
        logging.info("retrieval %s: %s", split, notes[-1])
        sample, chosen = report.sample_queries(len(queries.ids), ec.report_queries)
        ranked_by_kind, per_query_by_kind = {}, {}
        for kind in kinds:
            if kind == "tfidf":
                indices = tfidf.top_k(queries.titles, ec.top_k)
            else:
                with jax.set_mesh(mesh):
                    _, indices = ranker.top_k(queries.features[kind], gallery.features[kind],
                                              ec.top_k, mesh, query_chunk=ec.query_chunk,
                                              gallery_tile=ec.gallery_tile)
            ranked = ranked_by_kind[kind] = g_ids[indices]
            scores, warnings = metrics.score(ranked, labels, gt.gallery, query_ids=queries.ids)
            per_query_by_kind[kind], _ = metrics.per_query_scores(
                ranked[sample], [labels[i] for i in sample], gt.gallery, ns=(10,))
            results[f"{split}/{kind}"] = scores
            for warning in warnings:  # The headline's; the others' alike (--verbosity=1).
                if kind == ec.headline:
                    logging.warning("retrieval %s/%s: %s", split, kind, warning)
                else:
                    logging.vlog(1, "retrieval %s/%s: %s", split, kind, warning)
            if main:
                out_dir = os.path.join(workdir, "retrieval", split, kind)
                os.makedirs(out_dir, exist_ok=True)
                metrics.write_retrieval_file(os.path.join(out_dir, "retrieval_id_list.txt"),
                                             queries.ids, ranked)
                metrics.write_scores(os.path.join(out_dir, "metric_results.json"), scores)
        _log_table(split, step, {k: results[f"{split}/{k}"] for k in kinds}, ec.headline)
        if main and len(sample):
            wanted = {g for r in ranked_by_kind.values() for g in r[sample, :10].flat}
            items = report.read_items(config, ec.gallery_split, wanted)
            items.update(report.read_items(config, split, {queries.ids[i] for i in sample}))
            counts = collections.Counter(gt.gallery.values())
            positives = [sum(counts[label] for label in set(labels[i] or ())) for i in sample]
            for kind, ranked in ranked_by_kind.items():
                shown = [(queries.ids[i], labels[i] or (), list(ranked[i]), ap, p) for i, ap, p in
                         zip(sample, per_query_by_kind[kind][10]["AP"], positives)]
                report.write_report(
                    os.path.join(workdir, "retrieval", split, kind, "report.html"),
                    f"CAPTURE retrieval: {split} queries, {kind}, step {step}",
                    results[f"{split}/{kind}"], shown, gt.gallery, items, chosen)
    if main:
        descriptions = {**capture.FEATURE_KINDS, **baselines.DESCRIPTIONS}
        info = {"step": step, **(run_info or {}), "config": json.loads(config.to_json_best_effort())}
        report.write_index(os.path.join(workdir, "retrieval", "index.html"),
                           f"CAPTURE retrieval at step {step}", results, descriptions,
                           ec.headline, ec.baselines, info, notes)
    return [(f"retrieval/{key}/{m}@{n[3:]}", 100 * v) for key, scores in results.items()
            for n, s in scores.items() for m, v in s.items()]


def _log_table(split: str, step: int, scores: dict[str, metrics.Scores], headline: str) -> None:
    """One log line per kind (headline first), in percent, so a run shows how kinds compare."""
    order = [headline, *(k for k in scores if k != headline)]
    width = max(map(len, order))
    lines = [f"retrieval {split} at step {step} (percent; {headline} is the headline):"]
    lines += [f"  {kind:<{width}}  {metrics.percent(scores[kind])}" for kind in order]
    logging.info("\n".join(lines))
