"""The official Product1M scores (Prec@N, mAP@N, mAR@N) and a fast command for submission files.

The specification is "The official scores" in PRODUCT1M.md; its quirks are kept on purpose so that
numbers match published ones to the last digit. Scores are percentages (0..100), like the
`metric_results.json` the authors' script writes and the tables papers print. Readings of the rules
the prose leaves open:

* k == 0 (empty ranked list, or P == 0): Prec = AP = 0 (the authors' script divides by zero there
  and adds 0).
* AR: the script fails (divides by zero) when a label of L found among the first N retrieved items
  has e_l == 0. A retrieved item's label always has a gallery item, so e_l == 0 there means
  floor(N / |L|) == 0, i.e. |L| > N. Then every e_l is 0 and AR is 0 either way.
* Ids in R that are not gallery ids are misses, for AR too, and still count in |R|; so do empty
  ids, e.g. from a trailing comma. (The authors' AR code would fail on them and add 0; a real
  ranking of the gallery never has them, so they are warned about.) Ids are whitespace-stripped.
* Each line of the retrieval file counts once, even if its query id is repeated.

Usage: python -m capture_jax.metrics --gt_dir DIR --retrieval_file FILE --output_dir OUT
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

NS = (10, 50, 100)
Ranked = Sequence[Sequence[str]] | np.ndarray
Scores = dict[str, dict[str, float]]


def _examples(names: Sequence[str], mask: np.ndarray) -> str:
    picked = [names[i] for i in np.flatnonzero(mask)[:3]]
    return ", ".join(picked) + (", ..." if mask.sum() > 3 else "")


def per_query_scores(
    ranked: Ranked, query_labels: Sequence[Sequence[str] | None], gallery_labels: Mapping[str, str],
    ns: Sequence[int] = NS, query_ids: Sequence[str] | None = None,
) -> tuple[dict[int, dict[str, np.ndarray]], list[str]]:
    """Per-query AP, Prec and AR as fractions: ({N: {"AP"|"Prec"|"AR": [Q] array}}, warnings).

    `query_labels[q]` is None for a query without ground truth: it scores 0 (and is not warned
    about here; `align_with_ground_truth` does). `query_ids` only names queries in warnings.
    """
    ranked = ranked.tolist() if isinstance(ranked, np.ndarray) else ranked
    num_q, m = len(ranked), max(ns)
    if len(query_labels) != num_q:
        raise ValueError(f"{num_q} ranked lists but {len(query_labels)} label lists")
    names = [f"#{i}" for i in range(num_q)] if query_ids is None else list(query_ids)
    warnings = []
    # Labels as small integers; counts[v] = number of gallery items with label v.
    vocab: dict[str, int] = {}
    gallery_index = {g: vocab.setdefault(label, len(vocab)) for g, label in gallery_labels.items()}
    counts = np.bincount(np.fromiter(gallery_index.values(), np.int64, len(gallery_index)),
                         minlength=len(vocab))
    # retrieved[q, i]: label of the i-th retrieved item; -1 for unknown ids and past the end of R.
    lengths = np.fromiter(map(len, ranked), np.int64, num_q)
    flat = np.fromiter(map(gallery_index.get, itertools.chain.from_iterable(r[:m] for r in ranked),
                           itertools.repeat(-1)), np.int64)
    retrieved = np.full((num_q, m), -1, np.int64)
    retrieved[np.arange(m) < np.minimum(lengths, m)[:, None]] = flat
    stray = (retrieved < 0) & (np.arange(m) < lengths[:, None])
    if stray.any():
        warnings.append(f"{stray.sum()} retrieved ids in {stray.any(1).sum()} lines are not "
                        f"gallery ids (lines {_examples(names, stray.any(1))}); they are misses.")
    # Query labels, flattened with their query index; -1 marks a label with no gallery item.
    labels = [() if ls is None else ls for ls in query_labels]
    flat_q = np.repeat(np.arange(num_q), np.fromiter(map(len, labels), np.int64, num_q))
    flat_l = np.fromiter(map(vocab.get, itertools.chain.from_iterable(labels),
                             itertools.repeat(-1)), np.int64, len(flat_q))
    n_labels = np.bincount(flat_q, minlength=num_q)  # |L|, duplicates included.
    absent = np.zeros(num_q, bool)
    absent[flat_q[flat_l < 0]] = True
    empty = np.array([ls is not None and len(ls) == 0 for ls in query_labels], bool)
    for mask, what in ((absent, "have a label with no gallery item"), (empty, "have no labels")):
        if mask.any():
            warnings.append(f"{mask.sum()} queries {what} ({_examples(names, mask)}); they "
                            "score 0 and count in the means.")
    valid = (n_labels > 0) & ~absent
    keep = valid[flat_q]
    flat_q, flat_l = flat_q[keep], flat_l[keep]
    big_p = np.bincount(flat_q, counts[flat_l], minlength=num_q).astype(np.int64)  # P.
    # Distinct labels of each query in a [Q, D] matrix (-2 pads) with their multiplicities in L.
    pairs, mult = np.unique(flat_q * max(len(vocab), 1) + flat_l, return_counts=True)
    pair_q, pair_l = np.divmod(pairs, max(len(vocab), 1))
    slot = np.arange(len(pairs)) - np.searchsorted(pair_q, pair_q)
    d = int(slot.max()) + 1 if len(pairs) else 1
    qlab, qmult = np.full((num_q, d), -2, np.int64), np.zeros((num_q, d), np.int64)
    qlab[pair_q, slot], qmult[pair_q, slot] = pair_l, mult
    qcount = np.where(qlab >= 0, counts[np.maximum(qlab, 0)], 0)
    n_distinct = np.maximum(np.bincount(pair_q, minlength=num_q), 1)
    # match[q, i, j]: the i-th retrieved item has the j-th distinct label of q (so is in Pos).
    match = retrieved[:, :, None] == qlab[:, None, :]
    hit = match.any(-1)
    ranks = np.arange(1, m + 1)
    precision_at_i = np.cumsum(hit, axis=1) / ranks
    results = {}
    for n in ns:
        k = np.minimum(np.minimum(n, big_p), lengths)
        in_k = hit & (ranks <= k[:, None])
        h = in_k.sum(1)
        prec = np.divide(h, k, out=np.zeros(num_q), where=k > 0)
        ap_sum = np.where(in_k, precision_at_i, 0.0).sum(1)
        ap = np.divide(ap_sum, h, out=np.zeros(num_q), where=h > 0)
        expected = np.minimum(qmult * (n // np.maximum(n_labels, 1))[:, None], qcount)  # e_l.
        got = match[:, :n].sum(1)  # Retrieved count per label in the first N of R (not k).
        ratio = np.divide(np.minimum(got, expected), expected, out=np.zeros(got.shape),
                          where=expected > 0)
        # The official script's division by zero; it only happens when |L| > N, where every e_l
        # is 0 and AR would be 0 anyway, but it is kept literal.
        fails = ((expected == 0) & (got > 0)).any(1)
        ar = np.where(fails, 0.0, ratio.sum(1) / n_distinct)
        results[n] = {name: np.where(valid, v, 0.0)
                      for name, v in (("AP", ap), ("Prec", prec), ("AR", ar))}
    return results, warnings


def score(
    ranked: Ranked, query_labels: Sequence[Sequence[str] | None], gallery_labels: Mapping[str, str],
    ns: Sequence[int] = NS, query_ids: Sequence[str] | None = None,
) -> tuple[Scores, list[str]]:
    """Official scores in percent, {"top10": {"mAP", "Prec", "mAR"}, ...}, and warnings."""
    if not len(ranked):
        raise ValueError("there are no queries to score")
    per_query, warnings = per_query_scores(ranked, query_labels, gallery_labels, ns, query_ids)
    scores = {f"top{n}": {key: 100 * float(s[name].mean())
                          for key, name in (("mAP", "AP"), ("Prec", "Prec"), ("mAR", "AR"))}
              for n, s in per_query.items()}
    return scores, warnings


def read_retrieval_file(path: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """Reads `query_id,g0,g1,...` lines (blank lines skipped, whitespace and CRLF stripped)."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                query_id, *ids = [x.strip() for x in line.strip().split(",")]
                entries.append((query_id, ids))
    return entries


def write_retrieval_file(path: str | os.PathLike, query_ids: Sequence[str],
                         ranked_ids: Ranked) -> None:
    """Writes `retrieval_id_list.txt`: one line `query_id,g0,g1,...` per query, best first."""
    with open(path, "w", encoding="utf-8") as f:
        for query_id, ids in zip(query_ids, ranked_ids, strict=True):
            f.write(",".join([str(query_id), *map(str, ids)]) + "\n")


def read_ground_truth(gt_dir: str | os.PathLike, splits: Sequence[str] = ("dev", "test")
                      ) -> tuple[dict[str, str], dict[str, tuple[str, ...]], list[str]]:
    """Reads the official files: ({gallery id: label}, {query id: labels}, warnings).

    Queries of all `splits` go into one table, as in the official script.
    """
    from tfds_product1m import product1m_files  # Imports TensorFlow: only when files are read.

    tables, warnings = [], []
    for split in ("gallery", *splits):
        path = os.path.join(gt_dir, product1m_files.split_filename(split))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ground-truth file {path} not found: put the official "
                                    "Product1M files in --gt_dir (or pick the split with --split).")
        rows, stats = product1m_files.read_split_file(path, split)
        if sum(stats.skipped.values()):
            warnings.append(f"{os.path.basename(path)}: skipped rows {dict(stats.skipped)}.")
        tables.append({row.id: row.labels for row in rows})
    gallery = {gid: labels[0] for gid, labels in tables[0].items()}
    return gallery, {qid: labels for table in tables[1:] for qid, labels in table.items()}, warnings


def align_with_ground_truth(
    entries: Sequence[tuple[str, Sequence[str]]], query_gt: Mapping[str, Sequence[str]],
) -> tuple[list[str], list[Sequence[str]], list[Sequence[str] | None], list[str]]:
    """Builds `score`'s inputs from retrieval lines: (query ids, ranked, labels, warnings).

    A line with an unknown query id gets labels None: it scores 0 and counts in the means.
    """
    query_ids = [q for q, _ in entries]
    labels = [query_gt.get(q) for q in query_ids]
    warnings = []
    unknown = np.array([ls is None for ls in labels], bool)
    if unknown.any():
        warnings.append(f"{unknown.sum()} lines have query ids not in the ground truth "
                        f"({_examples(query_ids, unknown)}); they score 0 and count in the means.")
    repeated = [q for q, c in collections.Counter(query_ids).items() if c > 1]
    if repeated:
        warnings.append(f"{len(repeated)} query ids are on more than one line "
                        f"(e.g. {repeated[0]}); every line counts.")
    return query_ids, [ids for _, ids in entries], labels, warnings


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Official Product1M scores of a retrieval file.")
    parser.add_argument("--gt_dir", required=True,
                        help="folder with the official product1m_*_ossurl_v2.txt files")
    parser.add_argument("--retrieval_file", required=True, help="lines query_id,gallery_id_0,...")
    parser.add_argument("--output_dir", required=True, help="where metric_results.json is written")
    parser.add_argument("--split", choices=("dev", "test", "both"), default="both",
                        help="queries to look up (default: dev and test in one table)")
    args = parser.parse_args(argv)
    try:
        if not os.path.isfile(args.retrieval_file):
            raise FileNotFoundError(f"retrieval file {args.retrieval_file} not found: pass the "
                                    "file your model wrote (retrieval_id_list.txt).")
        entries = read_retrieval_file(args.retrieval_file)
        if not entries:
            raise ValueError(f"retrieval file {args.retrieval_file} is empty: write one line "
                             "per query.")
        gallery, query_gt, warnings = read_ground_truth(
            args.gt_dir, ("dev", "test") if args.split == "both" else (args.split,))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    query_ids, ranked, labels, more = align_with_ground_truth(entries, query_gt)
    scores, score_warnings = score(ranked, labels, gallery, query_ids=query_ids)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "metric_results.json"), "w", encoding="utf-8") as f:
        json.dump(scores, f, indent=2)
    for key, s in scores.items():
        print(f"{key}: mAP {s['mAP']:.4f}  Prec {s['Prec']:.4f}  mAR {s['mAR']:.4f}")
    for warning in warnings + more + score_warnings:
        print(f"warning: {warning}")


if __name__ == "__main__":
    main()
