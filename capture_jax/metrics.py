"""The official Product1M scores (Prec@N, mAP@N, mAR@N) and the command that scores a file.

The rules are those of the authors' `evaluate_suit.py` (zhanxlin/Product1M, CAPTURE/), read from
its code; "The official scores" in docs/retrieval.md describes them. Results are fractions
(0..1), as the script writes them into `metric_results.json`; logs, TensorBoard and the reports
show percent. The arithmetic follows the script's order (left-to-right sums, AR's labels in the
order they are first retrieved), so a `metric_results.json` from here equals the script's to the
last digit. Where the script raises inside a query and goes on, this module gives the same
zeros:

* a line whose query id is unknown, or whose query has a label with no gallery item, or that has
  no gallery ids at all: 0 for every score, and it counts in the means;
* AR is 0 for a query when an id among its first N is not a gallery id (the script looks its
  label up and fails), or when a retrieved label's expected count is 0 (|L| > N); its AP and
  Prec still count;
* every line of the retrieval file counts, blank ones and repeated query ids included. Lines
  are stripped as a whole and split on commas; the ids are not stripped one by one.

Usage: python -m capture_jax.metrics --gt_dir DIR --retrieval_file FILE --output_dir OUT [--strict]
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np
from absl import flags

from capture_jax import cli
from tfds_product1m import product1m_files

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
    inside = np.arange(m) < np.minimum(lengths, m)[:, None]
    retrieved = np.full((num_q, m), -1, np.int64)
    retrieved[inside] = flat
    stray = (retrieved < 0) & inside
    if stray.any():
        warnings.append(f"{stray.sum()} retrieved ids in {stray.any(1).sum()} lines are not "
                        f"gallery ids (lines {_examples(names, stray.any(1))}); they are misses, "
                        "and the official script gives their lines AR 0.")
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
    valid = (n_labels > 0) & ~absent & (lengths > 0)
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
        # Left-to-right sums (cumulative sums are sequential; adding 0.0 changes nothing).
        ap_sum = np.cumsum(np.where(in_k, precision_at_i, 0.0), axis=1)[:, -1]
        ap = np.divide(ap_sum, h, out=np.zeros(num_q), where=h > 0)
        expected = np.minimum(qmult * (n // np.maximum(n_labels, 1))[:, None], qcount)  # e_l.
        found = match[:, :n]
        got = found.sum(1)  # Retrieved count per label in the first N of R (not k).
        ratio = np.divide(np.minimum(got, expected), expected, out=np.zeros(got.shape),
                          where=expected > 0)
        # The script sums the labels in the order they are first retrieved.
        first = np.where(got > 0, found.argmax(1), n)
        ratio = np.take_along_axis(ratio, np.argsort(first, axis=1, kind="stable"), axis=1)
        ar = np.cumsum(ratio, axis=1)[:, -1] / n_distinct
        # Where the script raises inside AR: a retrieved label expected 0 times (|L| > N), or
        # an id among the first N that is not in the gallery.
        fails = ((expected == 0) & (got > 0)).any(1) | stray[:, :n].any(1)
        ar = np.where(fails, 0.0, ar)
        results[n] = {name: np.where(valid, v, 0.0)
                      for name, v in (("AP", ap), ("Prec", prec), ("AR", ar))}
    return results, warnings


def mean(values: np.ndarray) -> float:
    """The mean as the official script takes it: a left-to-right sum over the lines, divided."""
    values = np.asarray(values, np.float64)
    return float(np.cumsum(values)[-1] / len(values)) if len(values) else 0.0


def score(
    ranked: Ranked, query_labels: Sequence[Sequence[str] | None], gallery_labels: Mapping[str, str],
    ns: Sequence[int] = NS, query_ids: Sequence[str] | None = None,
) -> tuple[Scores, list[str]]:
    """Official scores as fractions, {"top10": {"mAP", "Prec", "mAR"}, ...}, and warnings."""
    if not len(ranked):
        raise ValueError("there are no queries to score")
    per_query, warnings = per_query_scores(ranked, query_labels, gallery_labels, ns, query_ids)
    scores = {f"top{n}": {key: mean(s[name])
                          for key, name in (("mAP", "AP"), ("Prec", "Prec"), ("mAR", "AR"))}
              for n, s in per_query.items()}
    return scores, warnings


def usual_map(ranked: Ranked, query_labels: Sequence[Sequence[str] | None],
              gallery_labels: Mapping[str, str], ns: Sequence[int] = NS) -> dict[str, float]:
    """The usual mAP@N as fractions, {"top10": ..., ...}: not an official score.

    AP@N = (sum over the hits among the first N of the precision at that rank) / min(N, P), P =
    the gallery items with one of the query's labels; VIMER-UMS's Product1M evaluation uses it.
    The official AP@N divides by the hits found instead (a list with one hit, at rank 1, scores
    1 there). Queries without labels or without a positive in the gallery score 0 and count.
    """
    ranked = ranked.tolist() if isinstance(ranked, np.ndarray) else ranked
    counts = collections.Counter(gallery_labels.values())
    per_n = {n: np.zeros(len(ranked)) for n in ns}
    for q, (ids, labels) in enumerate(zip(ranked, query_labels, strict=True)):
        wanted = set(labels or ())
        positives = sum(counts[label] for label in wanted)
        if not positives:
            continue
        hits = np.fromiter((gallery_labels.get(g) in wanted for g in ids[:max(ns)]), bool)
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        for n in ns:
            per_n[n][q] = precision[:n][hits[:n]].sum() / min(n, positives)
    return {f"top{n}": mean(v) for n, v in per_n.items()}


def write_scores(path: str | os.PathLike, scores: Scores) -> None:
    """`metric_results.json` byte for byte as the official script writes it."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(scores, f, indent=2, ensure_ascii=False)


def read_retrieval_file(path: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """Every line of a retrieval file as `(query id, [gallery ids])`, as the official script splits
    it: universal newlines, the line stripped as a whole, split on commas (blank lines too)."""
    with open(path, encoding="utf-8") as f:
        return [(fields[0], fields[1:]) for fields in (line.strip().split(",") for line in f)]


def write_retrieval_file(path: str | os.PathLike, query_ids: Sequence[str],
                         ranked_ids: Ranked) -> None:
    """Writes `retrieval_id_list.txt`: one line `query_id,g0,g1,...` per query, best first."""
    with open(path, "w", encoding="utf-8") as f:
        for query_id, ids in zip(query_ids, ranked_ids, strict=True):
            f.write(",".join([str(query_id), *map(str, ids)]) + "\n")


def read_ground_truth(gt_dir: str | os.PathLike, splits: Sequence[str] = ("dev", "test")
                      ) -> tuple[dict[str, str], dict[str, tuple[str, ...]], list[str]]:
    """The official files as the script reads them: ({gallery id: label}, {query id: labels},
    warnings). Queries of all `splits` go into one table; on a shared id dev wins, as there."""
    tables, warnings = {}, []
    for split in ("gallery", *splits):
        path = os.path.join(gt_dir, product1m_files.split_filename(split))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ground-truth file {path} not found: put the official "
                                    "Product1M files in --gt_dir (or pick the split with --split).")
        table = product1m_files.read_official_labels(path)
        warnings += ground_truth_warnings(os.path.basename(path), table)
        tables[split] = table.labels
    gallery = {gid: labels[0] for gid, labels in tables.pop("gallery").items()}
    queries = {}
    for split in sorted(tables, key=lambda s: s == "dev"):  # The script reads test, then dev.
        queries.update(tables[split])
    return gallery, queries, warnings


def ground_truth_warnings(name: str, table) -> list[str]:
    """What in a ground-truth file (an `OfficialLabels`) the scores treat unlike a reader might
    expect, one sentence each."""
    out = []
    if table.unusable_lines:
        out.append(f"{name}: {len(table.unusable_lines)} blank or short lines (e.g. line "
                   f"{table.unusable_lines[0]}) are left out; the official script stops on them.")
    if table.repeated_ids:
        out.append(f"{name}: {table.repeated_ids} lines repeat an earlier id; the later line's "
                   "labels count, as in the official script.")
    if table.padded:
        out.append(f"{name}: {table.padded} rows have spaces around the id or a label; the official "
                   "script keeps them, so those ids and labels match nothing with the spaces.")
    return out


# What `check_lines` finds, as (kind, sentence); `--strict` rejects the first, otherwise each
# kind is one warning and the official semantics stand.
_PROBLEMS = {
    "blank": "is blank (the official script counts it as a query that scores 0)",
    "format": "is not `query_id,gallery_id,...` (no gallery ids, or an empty or space-padded id)",
    "too_long": "has more than 100 gallery ids (only the first 100 are scored)",
    "repeated": "repeats the query id of an earlier line (both lines count)",
    "unknown_query": "has a query id that is not in the ground truth (it scores 0)",
    "unknown_id": "has a gallery id that is not in the gallery (a miss; AR 0)",
}


def check_lines(entries: Sequence[tuple[str, Sequence[str]]], gallery: Mapping[str, str],
                query_gt: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    """{problem kind: 1-based line numbers} for the retrieval lines `entries` (see `_PROBLEMS`)."""
    found: dict[str, list[int]] = collections.defaultdict(list)
    seen: set[str] = set()
    for number, (query_id, ids) in enumerate(entries, start=1):
        if not query_id and not ids:
            found["blank"].append(number)
            continue
        if not ids or any(not x or x != x.strip() for x in (query_id, *ids)):
            found["format"].append(number)
        if len(ids) > max(NS):
            found["too_long"].append(number)
        if query_id in seen:
            found["repeated"].append(number)
        seen.add(query_id)
        if query_id not in query_gt:
            found["unknown_query"].append(number)
        if any(x not in gallery for x in ids):
            found["unknown_id"].append(number)
    return dict(found)


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


def percent(scores: Scores) -> str:
    """One line of a scores dict in percent, for logs: `top10: mAP 61.11 Prec ... | top50: ...`."""
    return " | ".join(f"{n}: " + " ".join(f"{k} {100 * v:.2f}" for k, v in s.items())
                      for n, s in scores.items())


# ------------------------------------------------------------------------------ the command
FLAGS = flags.FlagValues()  # The command's own flags (the library imports this module).
flags.DEFINE_string("gt_dir", None, "Folder with the official product1m_*_ossurl_v2.txt files.",
                    required=True, flag_values=FLAGS)
flags.DEFINE_string("retrieval_file", None, "Lines query_id,gallery_id_0,...", required=True,
                    flag_values=FLAGS)
flags.DEFINE_string("output_dir", None, "Where metric_results.json is written.", required=True,
                    flag_values=FLAGS)
flags.DEFINE_enum("split", "both", ["dev", "test", "both"],
                  "Queries to look up (both: dev and test in one table).", flag_values=FLAGS)
flags.DEFINE_bool("strict", False, "Reject a malformed line (format, over 100 ids, a repeated "
                  "query, an unknown id) with its line number instead of scoring it.",
                  flag_values=FLAGS)


def main(argv: Sequence[str]) -> None:
    """Scores `--retrieval_file` into `--output_dir/metric_results.json` and prints the scores;
    a missing or (with --strict) malformed input ends the process with one sentence, exit 2."""
    cli.no_arguments(argv)
    try:
        if not os.path.isfile(FLAGS.retrieval_file):
            raise FileNotFoundError(f"retrieval file {FLAGS.retrieval_file} not found: pass the "
                                    "file your model wrote (retrieval_id_list.txt).")
        entries = read_retrieval_file(FLAGS.retrieval_file)
        if not entries:
            raise ValueError(f"retrieval file {FLAGS.retrieval_file} is empty: write one line "
                             "per query.")
        gallery, query_gt, warnings = read_ground_truth(
            FLAGS.gt_dir, ("dev", "test") if FLAGS.split == "both" else (FLAGS.split,))
        problems = check_lines(entries, gallery, query_gt)
        if FLAGS.strict and problems:
            number, kind = min((lines[0], kind) for kind, lines in problems.items())
            raise ValueError(f"{FLAGS.retrieval_file}, line {number} {_PROBLEMS[kind]}; fix the "
                             "file or score it without --strict.")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for kind, lines in problems.items():
        more = f" and {len(lines) - 1} more" if len(lines) > 1 else ""
        warnings.append(f"line {lines[0]}{more} {_PROBLEMS[kind]}.")
    query_ids, ranked, labels, _ = align_with_ground_truth(entries, query_gt)
    scores, _ = score(ranked, labels, gallery, query_ids=query_ids)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    write_scores(os.path.join(FLAGS.output_dir, "metric_results.json"), scores)
    for key, s in scores.items():
        print(f"{key}: mAP {s['mAP']:.6f}  Prec {s['Prec']:.6f}  mAR {s['mAR']:.6f}")
    for warning in warnings:
        print(f"warning: {warning}")


if __name__ == "__main__":
    cli.run(main, FLAGS)
