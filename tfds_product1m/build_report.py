"""What a Product1M build tells its user: per-split summaries, a final table, skip warnings.

The builder (`tfds_product1m_dataset_builder.py`) calls these; they read the per-split audits it
stores under `build_stats` (the `SplitStats.to_json()` form) and only log, so the built data and
`metadata.json` do not depend on anything here. Also two pieces of TFDS noise a user can do
nothing about are removed: progress bars when stderr is not a terminal (they come out as
`\\r`-mangled lines in log files), and the "Variant folder ... has no dataset_info.json" warning
TFDS logs whenever it asks whether a not yet built `tfds_product1m` variant is built.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import sys
from collections.abc import Mapping

from absl import logging
from etils import epath

# A split that skipped more than this share of its rows gets a WARNING with what to check.
WARN_SKIPPED_SHARE = 0.05

# What to check, per skip reason the builder knows (`product1m_files.SKIP_REASONS`).
ADVICE = {
    "short_row": "rows with too few '#####'-separated fields: check that the split file is the "
                 "official product1m_<split>_ossurl_v2.txt, complete, and not re-saved by an "
                 "editor or spreadsheet that changed its separators or cut long lines.",
    "bad_id": "rows whose first field is empty or holds '/', '\\', a space or a tab: check that "
              "the first field of every row is the item id (no extra leading column).",
    "no_labels": "gallery/dev/test rows with an empty label field: check that this split's file "
                 "is the official labelled one (instance labels in the fifth field), not a "
                 "train-format file under a gallery/dev/test name.",
    "duplicate_id": "ids repeated within the split (the first row is kept): check that the file "
                    "was not concatenated with another copy of itself.",
    "missing_image": "no <id>.jpg anywhere under the manual directory: check that --manual_dir "
                     "points at the directory holding the downloaded images (any folder layout "
                     "below it), that the download finished, and that every file is named by its "
                     "row id, e.g. 123456789012.jpg (not the URL's file name).",
    "bad_image": "image files that do not decode (truncated, empty, or not an image such as a "
                 "saved HTML error page): check the download log for failed or interrupted "
                 "files and download those ids again.",
    "missing_regions": "no feature line for the id in any *.tsv under the manual directory: "
                       "check that every bottom-up-attention TSV file is below --manual_dir and "
                       "that their image_id column holds the Product1M ids.",
    "bad_regions": "feature lines that do not decode (wrong field count, bad base64, boxes or "
                   "features that do not match num_boxes or the config's feature_dim, "
                   "non-finite values): check that the TSV files were written completely, in the "
                   "bottom-up-attention format, by a detector of the config's feature width.",
    # Beam builds whose runner reports no counters: image-level reasons are unknown here.
    "image_or_region_checks": "rows dropped at the image/region checks on the Beam workers: see "
                              "the pipeline's counters product1m:<split>/<reason> for the "
                              "reasons.",
}


def skipped_total(stats: Mapping) -> int:
    return sum(stats["skipped"].values())


def skipped_share(stats: Mapping) -> float:
    return skipped_total(stats) / stats["rows_read"] if stats["rows_read"] else 0.0


def _percent(count: int, of: int) -> str:
    return f"{100 * count / of:.1f}%" if of else "0.0%"


def _reasons(stats: Mapping) -> list[tuple[str, int]]:
    """[(reason, count)] of the non-zero skip reasons, most first (then by name)."""
    return sorted(((r, n) for r, n in stats["skipped"].items() if n), key=lambda x: (-x[1], x[0]))


def reasons_text(stats: Mapping, with_share: bool = True) -> str:
    """`missing_image 512 (51.2%), bad_image 3 (0.3%)`: non-zero skip reasons, most first."""
    return ", ".join(f"{r} {n:,}" + (f" ({_percent(n, stats['rows_read'])})" if with_share else "")
                     for r, n in _reasons(stats)) or "none"


def split_line(split: str, stats: Mapping) -> str:
    """The one-line summary of a split's audit."""
    skipped = skipped_total(stats)
    line = (f"Product1M {split}: read {stats['rows_read']:,} rows, wrote {stats['written']:,}, "
            f"skipped {skipped:,} ({_percent(skipped, stats['rows_read'])})")
    if skipped:
        line += f": {reasons_text(stats, with_share=False)}"
    fixed = stats.get("fixed") or {}
    if fixed:
        line += "; repaired and kept: " + ", ".join(f"{k} {v:,}" for k, v in fixed.items())
    blank = stats.get("blank_lines", 0)
    if blank:
        line += f"; {blank:,} blank line{'s' if blank != 1 else ''} ignored"
    return line + "."


def summary_table(name: str, audits: Mapping[str, Mapping | None], expected: set[str]) -> str:
    """One line per split: read, written, skipped (share) and the skip reasons.

    `audits[split]` is None for a split whose audit is unknown (its generation was cut short,
    e.g. by `max_examples_per_split`); `expected` are the splits whose skips are the synthetic
    generator's deliberate dirty rows.
    """
    lines = [f"Product1M build summary ({name}):",
             f"  {'split':<8} {'rows read':>11} {'written':>11} {'skipped':>18}  skip reasons"]
    for split, stats in audits.items():
        if stats is None:
            lines.append(f"  {split:<8} {'(not audited: generation stopped early)':>42}")
            continue
        skipped = skipped_total(stats)
        share = f"{skipped:,} ({_percent(skipped, stats['rows_read'])})"
        reasons = reasons_text(stats, with_share=False)
        if split in expected:
            reasons += " (the synthetic generator's deliberate dirty rows)"
        elif skipped_share(stats) > WARN_SKIPPED_SHARE:
            reasons += "  <- WARNING below"
        lines.append(f"  {split:<8} {stats['rows_read']:>11,} {stats['written']:>11,} "
                     f"{share:>18}  {reasons}")
    return "\n".join(lines)


def skip_warning(split: str, stats: Mapping, found: Mapping[str, str] = {}) -> str | None:
    """The WARNING text for a split that skipped more than `WARN_SKIPPED_SHARE`, else None.

    `found[reason]` is what the build saw that bears on `reason` (e.g. how many images it found
    where), added after that reason's advice.
    """
    if skipped_share(stats) <= WARN_SKIPPED_SHARE:
        return None
    skipped = skipped_total(stats)
    reasons = [r for r, _ in _reasons(stats)]
    lines = [f"Product1M {split}: {skipped:,} of {stats['rows_read']:,} rows skipped "
             f"({_percent(skipped, stats['rows_read'])}, more than "
             f"{WARN_SKIPPED_SHARE:.0%}); only {stats['written']:,} written. Main reasons: "
             f"{reasons_text(stats)}. What to check:"]
    for r in reasons:
        advice = ADVICE.get(r, "see the builder (product1m_files.SKIP_REASONS).")
        lines.append(f"  {r}: {advice}" + (f" This build {found[r]}." if r in found else ""))
    return "\n".join(lines)


def empty_split_error(split: str, stats: Mapping, found: Mapping[str, str] = {}) -> str:
    """The error for a split with no usable row (TFDS cannot write an empty split): which split,
    why its rows were skipped, and what to check for the main reason."""
    if not stats["rows_read"]:
        return (f"Product1M {split}: the split file has no row, so the split cannot be built: "
                "check that it is the complete official file, or remove it to build the others.")
    top = _reasons(stats)[0][0]
    advice = ADVICE.get(top, "see the builder (product1m_files.SKIP_REASONS).")
    return (f"Product1M {split}: no usable row, so the split cannot be built: all "
            f"{stats['rows_read']:,} rows were skipped ({reasons_text(stats, with_share=False)}); "
            f"{top}: {advice}" + (f" This build {found[top]}." if top in found else ""))


def log_build_summary(name: str, audits: Mapping[str, Mapping | None],
                      expected: set[str] = frozenset(), found: Mapping[str, str] = {}) -> None:
    """Logs the final table once (INFO), then one WARNING per split that skipped too much.

    No WARNING for the `expected` splits (see `summary_table`); `found` as in `skip_warning`.
    """
    if not audits:
        return
    logging.info("%s", summary_table(name, audits, set(expected)))
    for split, stats in audits.items():
        if stats is not None and split not in expected:
            warning = skip_warning(split, stats, found)
            if warning:
                logging.warning("%s", warning)


# --------------------------------------------------------------------------- TFDS noise
def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # No isatty, or a closed stream.
        return False


@contextlib.contextmanager
def progress_bars_only_on_a_terminal():
    """Turns TFDS's tqdm progress bars off for the block when stderr is not a terminal.

    Redirected to a file, every bar update is a `\\r`-separated fragment of a line. The previous
    setting is restored afterwards; bars on a terminal are left as they are.
    """
    if _stderr_is_a_terminal():
        yield
        return
    from tensorflow_datasets.core.utils import tqdm_utils

    was_on = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(False)
    try:
        yield
    finally:
        tqdm_utils.display_progress_bar(was_on)


class NotBuiltYetFilter(pylogging.Filter):
    """Drops TFDS's "Variant folder <data_dir>/<dataset>/<config>/<version> has no
    dataset_info.json" WARNING for `dataset`: `is_prepared()` logs it whenever that variant is
    not built yet, which for a build or a first use is the expected state, not a problem.

    Only that one message and only for this dataset's folders: every other TFDS warning (another
    dataset's, or a built folder missing features.json) still comes through.
    """

    _FORMAT = "Variant folder %s has no %s"

    def __init__(self, dataset: str):
        super().__init__()
        self.dataset = dataset

    def filter(self, record: pylogging.LogRecord) -> bool:
        args = record.args
        if record.msg != self._FORMAT or not isinstance(args, tuple) or len(args) != 2:
            return True
        folder, missing = args
        try:
            ours = epath.Path(folder).parent.parent.name == self.dataset
        except (TypeError, ValueError):
            return True
        return not (ours and str(missing) == "dataset_info.json")


def install_not_built_yet_filter(dataset: str) -> None:
    """Adds `NotBuiltYetFilter(dataset)` to the `absl` logger TFDS logs through (once)."""
    logger = pylogging.getLogger("absl")
    if not any(getattr(f, "dataset", None) == dataset and type(f).__name__ == "NotBuiltYetFilter"
               for f in logger.filters):
        logger.addFilter(NotBuiltYetFilter(dataset))
