"""Retrieval evaluation (`config.evals.<name>.type = "retrieval"`): embed gallery and queries,
rank, score by the official rules, write.

For every query split (dev, test) and every feature kind (`feature_kinds`, described in
`models.capture.FEATURE_KINDS`) and untrained baseline (`baselines`, see `baselines.py`), process
0 writes under `workdir/retrieval/<split>/<kind>/`: `retrieval_id_list.txt` (official format,
`qid,g0,...,g99`), `metric_results.json` (the official scores as fractions, as the authors'
script writes them) and `report.html`; and `workdir/retrieval/index.html`, the table of all of
them. Every process embeds (`embedding.py`) and ranks (`ranker.py`; collectives).

Scores use the official ground truth kept with the built dataset (`ground_truth.py`), so they
equal `python -m capture_jax.metrics` run on the written `retrieval_id_list.txt` with the
official text files.
"""

import collections
import json
import os

import jax
import numpy as np
from absl import logging

from capture_jax import metrics
from capture_jax.evaluators import baselines as baseline_lib
from capture_jax.evaluators import embedding, ground_truth, report
from capture_jax.evaluators import ranker as ranker_lib
from capture_jax.models import capture


class Evaluator:
    """Official Product1M retrieval scores of every feature kind and baseline; see the module."""

    def __init__(self, experiment, *, batch_size: int, gallery_split: str,
                 query_splits: tuple[str, ...], feature_kinds: tuple[str, ...], headline: str,
                 baselines: tuple[str, ...], top_k: int, query_chunk: int, gallery_tile: int,
                 ranker: str, screen_candidates: int, report_queries: int):
        unknown = [k for k in feature_kinds if k not in capture.FEATURE_KINDS]
        if unknown:
            raise ValueError(f"Unknown feature kinds {unknown} in config.evals.retrieval."
                             f"feature_kinds; choose from {list(capture.FEATURE_KINDS)}.")
        baseline_lib.check(baselines, experiment.config.model.visual.kind)
        if headline not in (*feature_kinds, *baselines):
            raise ValueError(f"config.evals.retrieval.headline={headline!r} is not among the "
                             f"evaluated kinds {[*feature_kinds, *baselines]}: add it to "
                             "feature_kinds.")
        self.exp, self.batch_size = experiment, batch_size
        self.gallery_split, self.query_splits = gallery_split, tuple(query_splits)
        self.feature_kinds, self.baselines = tuple(feature_kinds), tuple(baselines)
        self.headline, self.top_k, self.report_queries = headline, top_k, report_queries
        self.query_chunk, self.gallery_tile = query_chunk, gallery_tile
        self.ranker = ranker_lib.resolve_method(ranker, experiment.mesh)
        logging.info("retrieval: ranking with the %r method (config ranker=%r).", self.ranker,
                     ranker)
        self.screen_candidates = screen_candidates

    def _embed(self, model_state, split: str) -> embedding.Embedded:
        image = tuple(b for b in self.baselines if b in baseline_lib.IMAGE_BASELINES)
        return embedding.embed_split(self.exp, model_state, split, self.batch_size, image)

    def _rank(self, kind: str, queries: embedding.Embedded, gallery: embedding.Embedded,
              tfidf) -> np.ndarray:
        """Gallery row indices [num_queries, top_k] of `kind`'s ranking."""
        if kind == "tfidf":
            return tfidf.top_k(queries.titles, self.top_k)
        with jax.set_mesh(self.exp.mesh):
            stats = {}
            _, indices = ranker_lib.top_k(
                queries.features[kind], gallery.features[kind], self.top_k, self.exp.mesh,
                method=self.ranker, query_chunk=self.query_chunk, gallery_tile=self.gallery_tile,
                screen_candidates=self.screen_candidates, stats=stats)
            if stats.get("ranked_again"):
                why = ("were not certified by the bfloat16 screen" if self.ranker == "screen"
                       else "had ties running past faiss's margin")
                logging.info("Ranking %s: %d of %d queries %s and were ranked again in float32.",
                             kind, stats["ranked_again"], len(indices), why)
        return indices

    def evaluate(self, model_state, step: int) -> list[tuple[str, float]]:
        """Embeds, ranks, scores and writes every query split x (feature kind, baseline).

        Returns `(name, value)` pairs: `<split>/<kind>/mAP@10` etc. in percent. The official
        fractions go to the files.
        """
        exp, main = self.exp, self.exp.is_main
        gt = ground_truth.load(exp.builder, self.gallery_split, self.query_splits)
        gallery = self._embed(model_state, self.gallery_split)
        g_ids = np.asarray(gallery.ids)
        kinds = (*self.feature_kinds, *self.baselines)
        tfidf = baseline_lib.TfIdf(gallery.titles) if "tfidf" in self.baselines else None
        results, usual, notes = {}, {}, list(gt.warnings)
        unofficial = sorted(set(gallery.ids) - set(gt.gallery))
        if unofficial:  # Retrieving them is a miss: said once here, not per kind and split.
            notes.append(f"{len(unofficial)} built gallery rows have ids that the official script "
                         f"does not read as gallery ids ({', '.join(map(repr, unofficial[:3]))}: "
                         "e.g. an id padded with spaces in the text file); where a ranking "
                         "retrieves them, they count as misses, as in the official scores.")
            logging.info("retrieval: %s", notes[-1])
        for split in self.query_splits:
            queries = self._embed(model_state, split)
            labels = [gt.queries[split].get(q) for q in queries.ids]
            notes.append(ground_truth.unreachable_note(split, gt, set(gallery.ids)))
            logging.info("retrieval %s: %s", split, notes[-1])
            sample, chosen = report.sample_queries(len(queries.ids), self.report_queries)
            ranked_by_kind, per_query_by_kind = {}, {}
            for kind in kinds:
                ranked = ranked_by_kind[kind] = g_ids[self._rank(kind, queries, gallery, tfidf)]
                scores, warnings = metrics.score(ranked, labels, gt.gallery, query_ids=queries.ids)
                per_query_by_kind[kind], _ = metrics.per_query_scores(
                    ranked[sample], [labels[i] for i in sample], gt.gallery, ns=(10,))
                results[f"{split}/{kind}"] = scores
                usual[f"{split}/{kind}"] = metrics.usual_map(ranked, labels, gt.gallery)
                for warning in warnings:  # The headline's; the others' alike (--verbosity=1).
                    explained = unofficial and "are not gallery ids" in warning
                    if kind == self.headline and not explained:
                        logging.warning("retrieval %s/%s: %s", split, kind, warning)
                    else:
                        logging.vlog(1, "retrieval %s/%s: %s", split, kind, warning)
                if main:
                    out_dir = os.path.join(exp.workdir, "retrieval", split, kind)
                    os.makedirs(out_dir, exist_ok=True)
                    metrics.write_retrieval_file(os.path.join(out_dir, "retrieval_id_list.txt"),
                                                 queries.ids, ranked)
                    metrics.write_scores(os.path.join(out_dir, "metric_results.json"), scores)
            _log_table(split, step, {k: results[f"{split}/{k}"] for k in kinds}, self.headline,
                       {k: usual[f"{split}/{k}"] for k in kinds})
            if main and len(sample):
                self._write_reports(split, step, queries, ranked_by_kind, per_query_by_kind,
                                    sample, chosen, labels, gt, results)
        if main:
            descriptions = {**capture.FEATURE_KINDS, **baseline_lib.DESCRIPTIONS}
            info = {"step": step, "variant": exp.config.get("variant"),
                    "seed": exp.config.get("seed"), "workdir": exp.workdir,
                    "config": json.loads(exp.config.to_json_best_effort())}
            report.write_index(os.path.join(exp.workdir, "retrieval", "index.html"),
                               f"CAPTURE retrieval at step {step}", results, descriptions,
                               self.headline, self.baselines, info, notes, usual)
        return [(f"{key}/{m}@{n[3:]}", 100 * v) for key, scores in results.items()
                for n, s in scores.items() for m, v in s.items()] + [
            (f"{key}/usual_mAP@{n[3:]}", 100 * v) for key, s in usual.items() for n, v in s.items()]

    def summary(self, values: dict[str, float]) -> list[str]:
        """Per query split: the headline's mAP@10, then the baselines'."""
        lines = []
        for split in self.query_splits:
            shown = [f"{kind} {values[f'{split}/{kind}/mAP@10']:.2f}"
                     for kind in (self.headline, *(b for b in self.baselines
                                                   if b != self.headline))
                     if f"{split}/{kind}/mAP@10" in values]
            if shown:
                lines.append(f"{split + ' mAP@10':<11} {shown[0]} (headline)"
                             + (f"; baselines {', '.join(shown[1:])}" if shown[1:] else ""))
        return lines

    def _write_reports(self, split, step, queries, ranked_by_kind, per_query_by_kind, sample,
                       chosen, labels, gt, results) -> None:
        """report.html of each kind: the sampled queries with their top 10."""
        builder = self.exp.builder
        wanted = {g for r in ranked_by_kind.values() for g in r[sample, :10].flat}
        items = report.read_items(builder, self.gallery_split, wanted)
        items.update(report.read_items(builder, split, {queries.ids[i] for i in sample}))
        counts = collections.Counter(gt.gallery.values())
        positives = [sum(counts[label] for label in set(labels[i] or ())) for i in sample]
        for kind, ranked in ranked_by_kind.items():
            shown = [(queries.ids[i], labels[i] or (), list(ranked[i]), ap, p) for i, ap, p in
                     zip(sample, per_query_by_kind[kind][10]["AP"], positives)]
            report.write_report(
                os.path.join(self.exp.workdir, "retrieval", split, kind, "report.html"),
                f"CAPTURE retrieval: {split} queries, {kind}, step {step}",
                results[f"{split}/{kind}"], shown, gt.gallery, items, chosen)


def _log_table(split: str, step: int, scores: dict[str, metrics.Scores], headline: str,
               usual: dict[str, dict[str, float]]) -> None:
    """One log line per kind (headline first), in percent, so a run shows how kinds compare:
    the official scores, then the usual mAP (divided by min(N, positives); not official)."""
    order = [headline, *(k for k in scores if k != headline)]
    width = max(map(len, order))
    lines = [f"retrieval {split} at step {step} (percent; {headline} is the headline; "
             "usual mAP = AP@N / min(N, positives), not an official score):"]
    lines += [f"  {kind:<{width}}  {metrics.percent(scores[kind])} || usual mAP "
              + " ".join(f"@{n[3:]} {100 * v:.2f}" for n, v in usual[kind].items())
              for kind in order]
    logging.info("\n".join(lines))
