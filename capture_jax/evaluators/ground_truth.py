"""The official ground truth of a retrieval evaluation: every row of the gallery/dev/test text
files as the authors' script reads them, kept in the built dataset's metadata (also the rows the
build skipped for a missing image, which therefore count as misses, as they do officially)."""

from __future__ import annotations

import collections
import dataclasses

from capture_jax import metrics
from tfds_product1m import product1m_files


@dataclasses.dataclass
class GroundTruth:
    """The official labels of every gallery/query row of the text files (not only those built)."""

    gallery: dict[str, str]  # gallery id -> its (first) label
    queries: dict[str, dict[str, tuple[str, ...]]]  # split -> query id -> labels
    warnings: list[str]


def load(builder, gallery_split: str, query_splits: tuple[str, ...]) -> GroundTruth:
    """The ground truth stored with the built dataset (the builder's metadata `ground_truth`)."""
    stored = builder.info.metadata.get("ground_truth")
    if stored is None:
        raise ValueError(
            f"Dataset {builder.info.full_name} in {builder.data_dir} was built without the "
            "official ground truth (tfds_product1m < 1.1.0): rebuild it with this version "
            "(tfds build tfds_product1m --config=... --data_dir=...) and evaluate again.")
    missing = [s for s in (gallery_split, *query_splits) if s not in stored]
    if missing:
        raise ValueError(f"Dataset {builder.info.full_name} has no ground truth for splits "
                         f"{missing} (its text files were absent at build time): build them or "
                         "set config.evals.retrieval.query_splits.")
    warnings = []
    for split in (gallery_split, *query_splits):
        table = dataclasses.replace(product1m_files.OfficialLabels({}, [], 0, 0),
                                    **{k: v for k, v in stored[split].items() if k != "labels"})
        warnings += metrics.ground_truth_warnings(f"{split} text file", table)
    gallery = {gid: labels[0] for gid, labels in stored[gallery_split]["labels"].items()}
    queries = {s: {q: tuple(ls) for q, ls in stored[s]["labels"].items()} for s in query_splits}
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
