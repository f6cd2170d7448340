"""A model and an index that belong together: queries (picture, title, boxes) in, ranked items
out. Several queries are embedded together and ranked in one ranker call (the server batches
requests that arrive together); with boxes, each crop with the title is one query row and the
crops' lists merge, each item at its best score."""

from __future__ import annotations

import dataclasses

import numpy as np

from capture_jax.search import catalogue, inputs, run
from capture_jax.search.inputs import QueryError


@dataclasses.dataclass
class Query:
    """A checked query: its model rows (one per box, or one for the whole picture)."""

    rows: dict[str, np.ndarray]
    title: str
    boxes: list


def check_model(manifest: dict, fingerprint: dict) -> None:
    """One sentence if the index was not made by this model (architecture, vocabulary, step)."""
    mine = {k: manifest.get(k) for k in ("variant", "step", "config_hash")}
    theirs = {k: fingerprint[k] for k in mine}
    if mine != theirs:
        raise ValueError(f"The index was made by another model ({mine}) than the one loaded from "
                         f"{fingerprint['workdir']} ({theirs}): query it with the run and step "
                         "that made it, or index the catalogue again with this model.")


class Searcher:
    """Loads an index and the model that made it (its run and step, unless overridden)."""

    def __init__(self, index_path: str, *, workdir: str | None = None, step: int | None = None,
                 approximate: bool = False, batch_size: int = 8):
        self.index = catalogue.Index(index_path)
        m = self.index.manifest
        self.model = run.Model(workdir or m["workdir"], m["step"] if step is None else step,
                               batch_size=batch_size)
        check_model(m, self.model.fingerprint)
        if self.model.visual_kind != "pixels":
            raise ValueError("This model reads detector region features (model.visual.kind="
                             f"{self.model.visual_kind}): querying by picture needs a pixels "
                             "model (e.g. configs/capture.py:demo).")
        if approximate:
            for kind in m["feature_kinds"]:
                self.index.approximate(kind)
        self.approximate = approximate
        for kind in m["feature_kinds"]:  # Compiled once, here, not on the first query.
            self.model.warm_up((kind,))

    @property
    def kinds(self) -> list[str]:
        return list(self.index.manifest["feature_kinds"])

    def check_kind(self, kind: str | None) -> str:
        if not kind:
            return self.kinds[0]
        if kind not in self.kinds:
            raise QueryError(f"The index holds feature kinds {self.kinds}, not {kind!r}: query "
                             "one of those, or index the catalogue again with --kinds.")
        return kind

    def prepare(self, image: bytes, title: str | None, boxes: str | list | None = None) -> Query:
        """Checks a query (`QueryError` on bad input) and makes its model rows."""
        title = inputs.check_title(title)
        picture = inputs.read_picture(image, self.index.manifest["max_image_side"])
        boxes = inputs.parse_boxes(boxes) if isinstance(boxes, (str, type(None))) else boxes
        inputs.check_boxes(boxes, picture)
        pixels = inputs.pixel_rows(picture, boxes, self.model.image_size)
        rows = self.model.empty_rows(len(pixels))
        rows["image"] = pixels
        rows["text_ids"], rows["text_mask"] = inputs.text_rows(self.model.tokenizer, title,
                                                               len(pixels))
        return Query(rows, title, boxes)

    def search(self, queries: list[Query], k: int = 10, kind: str | None = None
               ) -> list[list[dict]]:
        """Per query, its top `k` items: {rank, row, id, title, score, box} (box: 1-based index
        of the box that gave the item its score, or None without boxes)."""
        kind = self.check_kind(kind)
        if not 1 <= k <= 1000:
            raise QueryError(f"k={k} is not between 1 and 1000: ask for fewer items.")
        rows = {key: np.concatenate([q.rows[key] for q in queries]) for key in queries[0].rows}
        features = self.model.embed(rows, (kind,))[kind]
        scores, found = self.index.search(kind, features, k, self.model.mesh, self.approximate)
        results, start = [], 0
        for q in queries:
            n = len(q.rows["text_ids"])
            results.append(self._merge(scores[start:start + n], found[start:start + n], k,
                                       bool(q.boxes)))
            start += n
        return results

    def _merge(self, scores: np.ndarray, rows: np.ndarray, k: int, boxes: bool) -> list[dict]:
        """One list from the rows' lists: each item at its best score, ties to the lower row."""
        best: dict[int, tuple[float, int]] = {}
        for crop, (s_row, r_row) in enumerate(zip(scores, rows)):
            for s, r in zip(s_row.tolist(), r_row.tolist()):
                if r >= 0 and (r not in best or s > best[r][0]):
                    best[r] = (s, crop)
        ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:k]
        return [{"rank": rank, "row": r, "id": self.index.ids[r], "title": self.index.titles[r],
                 "score": s, "box": crop + 1 if boxes else None}
                for rank, (r, (s, crop)) in enumerate(ranked, 1)]
