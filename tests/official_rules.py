"""A literal port of the rules of the authors' scoring script (not a test module itself).

The script is `CAPTURE/evaluate_suit.py` in zhanxlin/Product1M. This port keeps its data flow
step for step: the same file reading (`readlines`, each line stripped and split, nothing else
stripped), the same dicts (so a repeated id keeps the later line), the same loops and Python
float arithmetic in the same order, and the same outcome wherever the script raises inside a
query and carries on (a bare `except` around each query, after `cnt` is counted). It is slow on
purpose: `capture_jax.metrics` must equal it to the last bit.
"""

import json


def _labels_by_id(lines):
    table = {}
    for line in lines:
        fields = line.strip().split("#####")
        table[fields[0]] = fields[4].split("#;#")  # Raises on a short line, as the script does.
    return table


def _ap(ranked, positives, k):
    hits, ap = 0, 0
    for i in range(k):
        if ranked[i] in positives:
            hits += 1
            ap += hits / (i + 1)
    return 0 if hits == 0 else ap / hits


def _prec(ranked, positives, k):
    hits = sum(1 for i in range(k) if ranked[i] in positives)
    return float(hits / k)  # ZeroDivisionError for k == 0, as in the script.


def _ar(ranked, labels, ids_of_label, gallery, n):
    ranked = ranked[:n]
    expected = {}
    for label in labels:
        expected[label] = expected.get(label, 0) + int(n / len(labels))
    for label in expected:
        expected[label] = min(expected[label], len(ids_of_label[label]))
    got = {}
    for item in ranked:
        label = gallery[item][0]  # KeyError for an id that is not a gallery id.
        if label in expected:
            got[label] = got.get(label, 0) + 1
    for label in got:
        got[label] = min(got[label], expected[label])
    total = 0
    for label in got:  # Insertion order: the order labels are first retrieved.
        total += got[label] / expected[label]  # ZeroDivisionError when expected is 0.
    return total / len(set(labels))


def official_scores(gallery_lines, test_lines, dev_lines, retrieval_lines, ns=(10, 50, 100)):
    """The script's `results` dict for these lines (as `readlines()` would give them)."""
    gallery = _labels_by_id(gallery_lines)
    queries = _labels_by_id(test_lines)
    queries.update(_labels_by_id(dev_lines))
    ids_of_label = {}
    for item, labels in gallery.items():
        ids_of_label.setdefault(labels[0], []).append(item)
    results = {}
    for n in ns:
        m_ap = m_p = m_ar = 0
        count = 0
        for line in retrieval_lines:
            fields = line.strip().split(",")
            query, ranked = fields[0], fields[1:]
            try:
                count += 1
                labels = queries[query]
                positives = []
                for label in labels:
                    positives += ids_of_label[label]
                k = min(n, len(positives), len(ranked))
                ap = _ap(ranked, positives, k)
                p = _prec(ranked, positives, k)
                m_ap += ap
                m_p += p
                m_ar += _ar(ranked, labels, ids_of_label, gallery, n)
            except Exception:
                pass
        results[f"top{n}"] = {"mAP": m_ap / count, "Prec": m_p / count, "mAR": m_ar / count}
    return results


def score_files(gt_dir, retrieval_file, ns=(10, 50, 100)):
    """Reads the files as the script does and returns its `results`."""
    def lines(name):
        with open(f"{gt_dir}/product1m_{name}_ossurl_v2.txt") as f:
            return f.readlines()
    with open(retrieval_file) as f:
        retrieval = f.readlines()
    return official_scores(lines("gallery"), lines("test"), lines("dev"), retrieval, ns)


def write_json(path, results):
    """The script's `write_json`."""
    with open(path, "w") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
