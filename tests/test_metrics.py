"""Official Product1M scores: hand-computed rank lists, a literal port of the authors' script
(official_rules.py), and the scoring command."""

import json

import numpy as np
import pytest

import official_rules
from capture_jax import cli, metrics

# Gallery: label A has 5 items, B 3, C 2, D 1, X 20.
SIZES = {"A": 5, "B": 3, "C": 2, "D": 1, "X": 20}
GALLERY = {f"{lab.lower()}{i}": lab for lab, n in SIZES.items() for i in range(1, n + 1)}
X = [f"x{i}" for i in range(1, 21)]


def one(ranked, labels, ns=metrics.NS):
    """Per-query (AP, Prec, AR) of a single query, for each N."""
    per_query, warnings = metrics.per_query_scores([ranked], [labels], GALLERY, ns)
    got = {n: tuple(float(s[k][0]) for k in ("AP", "Prec", "AR")) for n, s in per_query.items()}
    return got, warnings


def check(got, want):
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=0, atol=1e-12, err_msg=f"N={n}")


def test_perfect_ranking():
    # P = 5, k = min(N, 5, 5) = 5, all hits: Prec = AP = 1. e_A = min(N, 5) = 5, g_A = 5: AR = 1.
    got, warnings = one(["a1", "a2", "a3", "a4", "a5"], ["A"])
    check(got, {n: (1, 1, 1) for n in metrics.NS})
    assert warnings == []


def test_hits_at_1_3_4():
    # P = 5, |R| = 10, so k = 5 for every N. First 5: a1 x1 a2 a3 x2 -> h = 3, Prec = 3/5.
    # AP = (1/1 + 2/3 + 3/4) / 3 = 29/36 (normalised by hits found, not by min(N, P) = 5).
    # AR: e_A = min(N, 5) = 5, g_A = 3 -> 3/5.
    got, _ = one(["a1", "x1", "a2", "a3", "x2", "x3", "x4", "x5", "x6", "x7"], ["A"])
    check(got, {n: (29 / 36, 3 / 5, 3 / 5) for n in metrics.NS})


def test_duplicate_label_counts_twice_in_p():
    # L = [D, D]: P = 1 + 1 = 2, so k = min(10, 2, 10) = 2; first 2: d1 (hit), x1 -> Prec = 1/2.
    # (With P = 1, Prec would be 1.) AP = 1. e_D = 2 * floor(N/2) capped at 1 -> 1, g_D = 1: AR = 1.
    got, _ = one(["d1", *X[:9]], ["D", "D"])
    check(got, {n: (1, 1 / 2, 1) for n in metrics.NS})


def test_duplicate_label_doubles_expected_count():
    # L = [X, X, B], |L| = 3, N = 10: floor(10/3) = 3, e_X = 2*3 = 6, e_B = min(3, 3) = 3.
    # P = 20 + 20 + 3 = 43, k = 10. Hits at 1..6 and 10 (d1, c1, c2 are not in Pos): Prec = 7/10,
    # AP = (6 * 1 + 7/10) / 7 = 67/70. AR = (g_X/e_X + g_B/e_B) / 2 = (5/6 + 2/3) / 2 = 3/4.
    # (Without doubling, e_X = 3 and g_X/e_X = min(5, 3)/3 = 1.)
    ranked = ["x1", "x2", "x3", "x4", "x5", "b1", "d1", "c1", "c2", "b2"]
    got, _ = one(ranked, ["X", "X", "B"], ns=(10,))
    check(got, {10: (67 / 70, 7 / 10, 3 / 4)})


def test_more_labels_than_n_gives_ar_zero():
    # L = [A] * 11. N = 10: floor(10/11) = 0, so e_A = 0 while a retrieved item has label A: the
    # official script fails on AR and adds 0. N = 50: e_A = min(11 * 4, 5) = 5, g_A = 3 -> 3/5.
    # Prec/AP still count: P = 55, |R| = 5, k = 5, hits 1..3 -> Prec = 3/5, AP = 1.
    got, _ = one(["a1", "a2", "a3", "x1", "x2"], ["A"] * 11, ns=(10, 50))
    check(got, {10: (1, 3 / 5, 0), 50: (1, 3 / 5, 3 / 5)})


def test_expected_count_capped_by_gallery():
    # L = [C, X], N = 10: floor(10/2) = 5, e_C = min(5, 2) = 2, e_X = min(5, 20) = 5.
    # R = c1 c2 x1 x2 x3 a1..a5: g_C = 2 -> 1, g_X = 3 -> 3/5, AR = (1 + 3/5) / 2 = 4/5.
    # P = 22, k = 10, hits 1..5: Prec = 1/2, AP = 1.
    got, _ = one(["c1", "c2", "x1", "x2", "x3", "a1", "a2", "a3", "a4", "a5"], ["C", "X"], ns=(10,))
    check(got, {10: (1, 1 / 2, 4 / 5)})


def test_ranked_list_shorter_than_n():
    # L = [X], R = x1 x2 a1: k = min(N, 20, 3) = 3, h = 2, Prec = 2/3, AP = (1 + 1) / 2 = 1.
    # AR: N = 10: e_X = 10 -> 2/10; N = 50 and 100: e_X = min(N, 20) = 20 -> 2/20.
    got, _ = one(["x1", "x2", "a1"], ["X"])
    check(got, {10: (1, 2 / 3, 1 / 5), 50: (1, 2 / 3, 1 / 10), 100: (1, 2 / 3, 1 / 10)})


def test_unknown_gallery_ids_are_misses_but_count_in_r():
    # R = zz a1 "" a2: |R| = 4, k = min(N, 5, 4) = 4, hits at 2 and 4: Prec = 2/4,
    # AP = (1/2 + 2/4) / 2 = 1/2. AR: the script looks up the label of zz and fails: 0.
    got, warnings = one(["zz", "a1", "", "a2"], ["A"])
    check(got, {n: (1 / 2, 1 / 2, 0) for n in metrics.NS})
    assert len(warnings) == 1 and "2 retrieved ids" in warnings[0]
    assert "not gallery ids" in warnings[0]
    # Past the first N the unknown id no longer touches AR@N: R = a1 x1..x10 zz.
    got, _ = one(["a1", *X[:10], "zz"], ["A"], ns=(10, 50))
    check(got, {10: (1, 1 / 5, 1 / 5), 50: (1, 1 / 5, 0)})


def test_ar_sums_labels_in_the_order_first_retrieved():
    # L = [B, A, C], N = 10: e_B = 3, e_A = 3, e_C = 2. R retrieves C first, then A (twice), then
    # B once: g/e = 1/2, 2/3, 1/3. The script adds them in that order (C, A, B), which rounds
    # differently from L's order or the labels' sorted order.
    ranked = ["c1", "a1", "a2", "b1", "x1", "x2", "x3", "x4", "x5", "x6"]
    got, _ = one(ranked, ["B", "A", "C"], ns=(10,))
    first_retrieved = (((0 + 1 / 2) + 2 / 3) + 1 / 3) / 3
    assert first_retrieved != (((0 + 1 / 3) + 2 / 3) + 1 / 2) / 3  # The order matters here.
    assert got[10][2] == first_retrieved


def test_empty_ranked_list_scores_zero():
    # k = 0: defined as 0 (the official script divides by zero and adds 0).
    got, _ = one([], ["A"])
    check(got, {n: (0, 0, 0) for n in metrics.NS})


def test_label_absent_from_gallery_scores_zero_and_counts():
    # Query 0 is perfect (1 everywhere); query 1 also lists "Z", which has no gallery item: 0 on
    # every metric, but it counts in the means -> 50%.
    perfect = ["a1", "a2", "a3", "a4", "a5"]
    scores, warnings = metrics.score([perfect] * 2, [["A"], ["A", "Z"]], GALLERY,
                                     query_ids=["q0", "q1"])
    assert scores == {f"top{n}": {"mAP": 0.5, "Prec": 0.5, "mAR": 0.5} for n in metrics.NS}
    assert len(warnings) == 1 and "no gallery item" in warnings[0] and "q1" in warnings[0]


def test_unknown_query_id_counts_in_denominator():
    # Lines: q0 perfect for [A], q1 hits at 1, 3, 4 (see above), q9 unknown -> 0.
    # mAP@10 = (1 + 29/36 + 0) / 3, Prec@10 = (1 + 3/5) / 3, mAR@10 = (1 + 3/5) / 3.
    entries = [("q0", ["a1", "a2", "a3", "a4", "a5"]),
               ("q1", ["a1", "x1", "a2", "a3", "x2", "x3", "x4", "x5", "x6", "x7"]), ("q9", ["a1"])]
    query_gt = {"q0": ("A",), "q1": ("A",)}
    ids, ranked, labels, warnings = metrics.align_with_ground_truth(entries, query_gt)
    assert labels[2] is None and len(warnings) == 1 and "q9" in warnings[0]
    scores, more = metrics.score(ranked, labels, GALLERY, query_ids=ids)
    assert more == []
    want = [(1 + 29 / 36) / 3, (1 + 3 / 5) / 3, (1 + 3 / 5) / 3]
    for n in metrics.NS:
        got = [scores[f"top{n}"][k] for k in ("mAP", "Prec", "mAR")]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_ndarray_input_matches_lists():
    rng = np.random.default_rng(1)
    ranked = rng.choice(list(GALLERY), size=(7, 30))
    labels = [list(rng.choice(list(SIZES), size=rng.integers(1, 4))) for _ in range(7)]
    assert metrics.score(ranked, labels, GALLERY) == metrics.score(ranked.tolist(), labels, GALLERY)


def random_problem(rng):
    num_labels = int(rng.integers(1, 12))
    gallery = {f"g{i}": f"L{rng.integers(num_labels)}" for i in range(int(rng.integers(1, 150)))}
    gallery_ids = list(gallery)
    query_gt, entries = {}, []
    for q in range(int(rng.integers(1, 25))):
        # Labels may repeat and, rarely, be absent from the gallery (L{num_labels + 1}).
        query_gt[f"q{q}"] = tuple(f"L{rng.integers(num_labels + (rng.random() < 0.05))}"
                                  for _ in range(int(rng.integers(1, 13))))
        query_id = f"q{q}" if rng.random() > 0.1 else f"unknown{q}"
        ranked = [gallery_ids[j] if rng.random() > 0.05 else "stray" for j in
                  rng.integers(len(gallery_ids), size=int(rng.integers(0, 121)))]
        entries.append((query_id, ranked))
    return entries, query_gt, gallery


def official_lines(entries, query_gt, gallery):
    """The problem as the official files' lines (the labels of every query in the dev file)."""
    row = "{}#####title#####https://a/{}.jpg#####https://b/{}.jpg#####{}\r\n"
    g_lines = [row.format(g, g, g, label) for g, label in gallery.items()]
    q_lines = [row.format(q, q, q, "#;#".join(ls)) for q, ls in query_gt.items()]
    r_lines = [",".join([q, *ranked]) + "\n" for q, ranked in entries]
    return g_lines, [], q_lines, r_lines


def test_equals_literal_port_of_official_script_on_random_problems():
    rng = np.random.default_rng(0)
    for _ in range(200):
        entries, query_gt, gallery = random_problem(rng)
        ids, ranked, labels, _ = metrics.align_with_ground_truth(entries, query_gt)
        ns = (1, 5, 10, 50, 100)
        scores, _ = metrics.score(ranked, labels, gallery, ns)
        want = official_rules.official_scores(*official_lines(entries, query_gt, gallery), ns)
        assert scores == want  # Exactly: same sums in the same order.


def test_retrieval_file_read_as_the_official_script_splits_it(tmp_path):
    path = tmp_path / "retrieval_id_list.txt"
    metrics.write_retrieval_file(path, ["q1", "q2"], np.array([["g1", "g2"], ["g3", "g4"]]))
    assert path.read_text() == "q1,g1,g2\nq2,g3,g4\n"
    path.write_bytes(b"q1, g1,g2\r\n\r\n  \nq2\r\nq3,g1,\n")
    want = [("q1", [" g1", "g2"]), ("", []), ("", []), ("q2", []), ("q3", ["g1", ""])]
    assert metrics.read_retrieval_file(path) == want


GT_ROW = "{}#####title {}#####https://a/{}.jpg#####https://b/{}.jpg#####{}"


def write_gt(folder, extra_gallery=()):
    """A real-format case: CRLF lines, a duplicate label, a repeated gallery id (the later line
    wins), a label with a stray space (kept by the official script)."""
    files = {"gallery": [("g1", "Brand A"), ("g2", "Brand A"), ("g3", "Brand B"), ("g4", "Brand C"),
                         ("g4", "Brand B"), *extra_gallery],
             "dev": [("q1", "Brand A#;#Brand A"), ("q3", "Brand A #;#Brand B"),
                     ("q4", "Brand B#;#Brand A#;#Brand B")],
             "test": [("q2", "Brand B")]}
    for split, rows in files.items():
        lines = [GT_ROW.format(i, i, i, i, labels) for i, labels in rows]
        text = "\r\n".join(lines) + "\r\n"
        (folder / f"product1m_{split}_ossurl_v2.txt").write_bytes(text.encode())


RETRIEVAL = (b"q1,g1,g3,g2\r\nq2,g3,g4\r\nqX,g1\r\nq3,g1,g2\r\nq4,g9,g3,g1,g4,g2\r\n\r\n"
             b"q1,g2,g1\r\nq2\r\n")


def test_command_equals_literal_port_of_official_script(tmp_path, capsys):
    write_gt(tmp_path)
    (tmp_path / "ret.txt").write_bytes(RETRIEVAL)
    cli.call(metrics, ["--gt_dir", str(tmp_path), "--retrieval_file", str(tmp_path / "ret.txt"),
                       "--output_dir", str(tmp_path / "out")])
    ours = (tmp_path / "out" / "metric_results.json").read_bytes()
    want = official_rules.score_files(str(tmp_path), str(tmp_path / "ret.txt"))
    official_rules.write_json(tmp_path / "official.json", want)
    assert ours == (tmp_path / "official.json").read_bytes()
    scores = json.loads(ours)
    assert list(scores) == ["top10", "top50", "top100"]
    assert all(list(s) == ["mAP", "Prec", "mAR"] for s in scores.values())
    # By hand, top10. Gallery: A = {g1, g2}, B = {g3, g4} (g4's later line). 8 lines count:
    # q1: L = [A, A], P = 4, k = 3, hits 1, 3: Prec 2/3, AP (1 + 2/3) / 2 = 5/6; AR 1.
    # q2: k = 2, both B: 1, 1, 1. qX: unknown, 0. q3: "Brand B " has no gallery item: 0.
    # q4: L = [B, A, B], P = 6, k = 5; g9 unknown: hits at 2..5: Prec 4/5,
    #     AP (1/2 + 2/3 + 3/4 + 4/5) / 4; AR 0 (the script fails on g9's label).
    # blank line: 0. q1 again: k = 2, both hits: 1, 1, 1. "q2" with no ids: k = 0, 0.
    ap4 = (1 / 2 + 2 / 3 + 3 / 4 + 4 / 5) / 4
    np.testing.assert_allclose(list(scores["top10"].values()),
                               [(5 / 6 + 1 + ap4 + 1) / 8, (2 / 3 + 1 + 4 / 5 + 1) / 8, 3 / 8],
                               rtol=0, atol=1e-15)
    printed = capsys.readouterr().out
    assert "top10: mAP 0.4" in printed
    for words in ("line 6 is blank", "line 3 has a query id", "line 5 has a gallery id",
                  "line 7 and 1 more repeats", "line 8 is not `query_id", "repeat an earlier id",
                  "spaces around"):
        assert words in printed, words


@pytest.mark.parametrize("line, why", [
    (b"q1,g1, g2", "line 2 is not `query_id,gallery_id,...`"),
    (b"q1," + b",".join(b"g1" for _ in range(101)), "line 2 has more than 100"),
    (b"q2,g3", "line 2 repeats the query id"),
    (b"qX,g1", "line 2 has a query id that is not in the ground truth"),
    (b"q1,g1,g7", "line 2 has a gallery id that is not in the gallery"),
    (b"", "line 2 is blank"),
])
def test_strict_rejects_a_malformed_line_with_its_number(tmp_path, capsys, line, why):
    write_gt(tmp_path)
    (tmp_path / "ret.txt").write_bytes(b"q2,g3,g4\r\n" + line + b"\r\nq1,g1\r\n")
    args = ["--gt_dir", str(tmp_path), "--retrieval_file", str(tmp_path / "ret.txt"),
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        cli.call(metrics, [*args, "--strict"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert why in err and "Traceback" not in err and not (tmp_path / "out").exists()
    cli.call(metrics, args)  # Without --strict: the official semantics, with a warning.
    assert "warning: " + why in capsys.readouterr().out


def test_command_test_split_only(tmp_path):
    write_gt(tmp_path)
    (tmp_path / "ret.txt").write_bytes(b"q1,g1,g2\nq2,g3\n")
    cli.call(metrics, ["--gt_dir", str(tmp_path), "--retrieval_file", str(tmp_path / "ret.txt"),
                       "--output_dir", str(tmp_path / "out"), "--split", "test"])
    scores = json.loads((tmp_path / "out" / "metric_results.json").read_text())
    # q1 is a dev query (0); q2: k = 1, a hit; e_B = 2 (g3 and g4), g_B = 1: AR 1/2.
    assert scores["top10"] == {"mAP": 0.5, "Prec": 0.5, "mAR": 0.25}
@pytest.mark.parametrize("missing", ["product1m_dev_ossurl_v2.txt", "ret.txt"])
def test_command_missing_file_exits_2(tmp_path, capsys, missing):
    write_gt(tmp_path)
    (tmp_path / "ret.txt").write_text("q1,g1\n")
    (tmp_path / missing).unlink()
    with pytest.raises(SystemExit) as e:
        cli.call(metrics, ["--gt_dir", str(tmp_path), "--retrieval_file", str(tmp_path / "ret.txt"),
                           "--output_dir", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert missing in err and "not found" in err and "Traceback" not in err


def test_usual_map_divides_by_min_n_and_positives():
    """The usual (not official) AP@N, by hand: sum of precision at each hit in the first N,
    divided by min(N, P)."""
    filler = [f"x{i}" for i in range(1, 21)]
    ranked = [["a1", "x1", "a2", "a3", "x2", *filler[2:]],  # A: P = 5; hits at ranks 1, 3, 4.
              ["x1", "d1"],  # D: P = 1; a hit at rank 2.
              [*filler[:12], "b1", "c1"],  # B, C: P = 5; hits at ranks 13 and 14.
              ["a1"],  # No labels: 0.
              ["a1"]]  # A label with no gallery item: 0.
    labels = [["A"], ["D"], ["B", "C", "C"], None, ["Z"]]
    first = (1 + 2 / 3 + 3 / 4) / 5  # min(N, 5) = 5 for every N; the official AP is /3.
    third = {10: 0.0, 50: (1 / 13 + 2 / 14) / 5, 100: (1 / 13 + 2 / 14) / 5}
    want = {f"top{n}": (first + 0.5 + third[n]) / 5 for n in metrics.NS}
    got = metrics.usual_map(ranked, labels, GALLERY)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    # One hit at rank 1 of P = 5: the official AP@10 is 1, the usual one 1/5.
    official, _ = metrics.score([["a1", *filler[:9]]], [["A"]], GALLERY)
    assert official["top10"]["mAP"] == 1.0
    assert metrics.usual_map([["a1", *filler[:9]]], [["A"]], GALLERY)["top10"] == 0.2
