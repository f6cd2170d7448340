"""Tests of capture_jax.input_pipeline on the synthetic_tiny Product1M build (32 px, T = 36)."""

import itertools
import os
import threading

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from capture_jax import input_pipeline as ip
from capture_jax import visual_inputs as vi
from capture_jax import vocab

T, SIZE, PATCH, BATCH = 36, 32, 16, 8
NUM_PATCHES = (SIZE // PATCH) ** 2


def make_config(data_dir, **overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({
        "dataset": {"name": "tfds_product1m/synthetic_tiny", "data_dir": str(data_dir),
                    "train_split": "train", "shuffle_buffer": 64},
        "vocab_path": None, "vocab_size": 4000, "seed": 0,
        "model": {"text": {"length": T}, "mlm_max_predictions": 0,
                  "visual": {"kind": "pixels", "image_size": SIZE, "patch_size": PATCH}},
        "global_batch_size": BATCH, "eval_batch_size": 5,
        "masking": {"mlm_prob": 0.15, "mrm_prob": 0.15},
    })
    config.update_from_flattened_dict(overrides)
    return config


def load_tokenizer(config, workdir):
    return vocab.load_tokenizer(config, workdir, ip.get_builder(config))


def train_iterator(config, workdir, **kwargs):
    """`create_train_iterator` with the builder and tokenizer that `experiment.setup` would pass."""
    return ip.create_train_iterator(config, ip.get_builder(config),
                                    load_tokenizer(config, workdir), **kwargs)


def eval_dataset(config, workdir, split):
    return ip.EvalDataset(config, ip.get_builder(config), load_tokenizer(config, workdir), split,
                          config.eval_batch_size)


def vocab_file(config, workdir):
    return vocab.vocab_file(config, workdir, ip.get_builder(config))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    tfds.builder("tfds_product1m/synthetic_tiny", data_dir=str(path)).download_and_prepare()
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("workdir"))


@pytest.fixture(scope="module")
def config(data_dir):
    return make_config(data_dir)


@pytest.fixture(scope="module")
def tokenizer(config, workdir):
    return load_tokenizer(config, workdir)


@pytest.fixture(scope="module")
def split_rows(data_dir):
    """{split: [(id, title, labels)]} read straight from TFDS."""
    builder = tfds.builder("tfds_product1m/synthetic_tiny", data_dir=str(data_dir))
    rows = {}
    for split in ("train", "dev"):
        ds = builder.as_dataset(split, decoders={"image": tfds.decode.SkipDecoding()})
        rows[split] = [(ex["id"].decode(), ex["title"].decode(), [s.decode() for s in ex["labels"]])
                       for ex in tfds.as_numpy(ds)]
    return rows


@pytest.fixture(scope="module")
def train_batches(config, workdir):
    """The first 14 batches (more than one epoch of 12) of an uninterrupted run."""
    return list(itertools.islice(train_iterator(config, workdir, start_step=0), 14))


def _write_vocab(path, tokens):
    path.write_text("".join(t + "\n" for t in list(vocab.RESERVED_TOKENS) + tokens), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------ batches and tokens
def test_train_batch_keys_shapes_dtypes(train_batches, tokenizer):
    batch = train_batches[0]
    expected = {"text_ids": ((BATCH, T), np.int32), "text_mask": ((BATCH, T), np.int32),
                "mlm_labels": ((BATCH, T), np.int32), "image": ((BATCH, SIZE, SIZE, 3), np.float32),
                "mrm_mask": ((BATCH, NUM_PATCHES), np.float32),
                "mrm_zero": ((BATCH, NUM_PATCHES), np.float32)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    for b in train_batches:
        ids, mask, labels = b["text_ids"], b["text_mask"], b["mlm_labels"]
        lengths = mask.sum(1)
        assert np.all(lengths >= 2)
        assert np.all(ids[:, 0] == tokenizer.cls_id)
        for row, n in enumerate(lengths):
            assert np.all(mask[row, :n] == 1) and np.all(mask[row, n:] == 0)
            assert ids[row, n - 1] == tokenizer.sep_id
            assert np.all(ids[row, n:] == tokenizer.pad_id)
            assert labels[row, 0] == -1 and np.all(labels[row, n - 1:] == -1)
        selected = labels >= 0
        assert np.all(ids[~selected] != tokenizer.mask_id)  # [MASK] only where selected.
        assert set(np.unique(b["mrm_mask"])) <= {0.0, 1.0}
        assert np.all(b["mrm_zero"] <= b["mrm_mask"])
    image = batch["image"]
    low = (0 - np.array(vi.IMAGENET_MEAN)) / np.array(vi.IMAGENET_STD)
    high = (1 - np.array(vi.IMAGENET_MEAN)) / np.array(vi.IMAGENET_STD)
    assert np.all(image >= low - 1e-4) and np.all(image <= high + 1e-4)
    assert image.std() > 0.1


def test_chinese_titles_tokenise_to_single_characters(tokenizer, split_rows):
    titles = [title for _, title, _ in split_rows["train"][:20]]
    ids, mask = (x.numpy() for x in tokenizer.encode(tf.constant(titles)))
    for title, row, m in zip(titles, ids, mask):
        assert m.sum() < T  # Not truncated, so every character must come out.
        pieces = tokenizer.tokens(row[m == 1])[1:-1]
        cjk = [c for c in title if vocab.is_cjk(c)]
        assert [p for p in pieces if len(p) == 1 and vocab.is_cjk(p)] == cjk
        assert "[UNK]" not in pieces


def test_tokenizer_special_ids_truncation_and_wordpieces(tmp_path):
    path = _write_vocab(tmp_path / "v.txt", ["雅", "诗", "兰", "黛", "50", "##ml", "lancome"])
    tok = vocab.Tokenizer(path, max_len=7)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.first_regular_id == 5 and tok.vocab_size == 12
    titles = tf.constant(["雅诗 50ML", "雅诗兰黛50ml LANCOME", ""])
    ids, mask = (x.numpy() for x in tok.encode(titles))
    assert tok.tokens(ids[0]) == ["[CLS]", "雅", "诗", "50", "##ml", "[SEP]", "[PAD]"]
    assert tok.tokens(ids[1]) == ["[CLS]", "雅", "诗", "兰", "黛", "50", "[SEP]"]  # truncated
    assert tok.tokens(ids[2][:2]) == ["[CLS]", "[SEP]"]
    assert mask[2].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert mask[:2].tolist() == [[1] * 6 + [0], [1] * 7]


# ------------------------------------------------------------------ vocabulary
def test_vocab_learned_once_and_reused(config, workdir, tokenizer, split_rows):
    path = os.path.join(workdir, "vocab.txt")
    assert tokenizer.vocab[:5] == list(vocab.RESERVED_TOKENS)
    before = (os.stat(path).st_mtime_ns, open(path, "rb").read())
    assert vocab_file(config, workdir) == path
    assert (os.stat(path).st_mtime_ns, open(path, "rb").read()) == before
    chars = {c for _, title, _ in split_rows["train"] for c in title if vocab.is_cjk(c)}
    assert chars and chars <= set(tokenizer.vocab)
    assert len(tokenizer.vocab) == len(set(tokenizer.vocab))


def test_given_vocab_used_verbatim_and_missing_one_is_a_clear_error(data_dir, tmp_path):
    unused = [f"[unused{i}]" for i in range(1, 4)]
    tokens = ["[PAD]"] + unused + list(vocab.RESERVED_TOKENS[1:]) + ["的"]
    path = tmp_path / "bert_vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    config = make_config(data_dir, vocab_path=str(path))
    assert vocab_file(config, str(tmp_path / "wd")) == str(path)
    assert not (tmp_path / "wd").exists()
    tok = load_tokenizer(config, str(tmp_path / "wd"))
    assert tok.vocab == tokens
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.first_regular_id) == (5, 6, 7, 8)
    config.vocab_path = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="does not exist: set --config.vocab_path"):
        vocab_file(config, str(tmp_path / "wd"))


# ------------------------------------------------------------------ masking
def _stats_tokenizer(tmp_path, size=1000):
    return vocab.Tokenizer(_write_vocab(tmp_path / "v.txt", [f"t{i}" for i in range(size - 5)]), 8)


def test_mlm_masking_statistics(tmp_path):
    tok = _stats_tokenizer(tmp_path)
    n = 20000
    body = np.random.default_rng(0).integers(tok.first_regular_id, tok.vocab_size, n)
    ids = np.concatenate([[tok.cls_id], body, [tok.sep_id], np.zeros(100, int)]).astype(np.int32)
    masked, labels = (x.numpy() for x in ip.mask_tokens(
        tf.constant(ids), ip.example_seed(0, 7), tok, 0.15))
    selected = labels >= 0
    assert not selected[0] and not selected[n + 1:].any()  # CLS, SEP, padding never selected.
    assert np.all(labels[selected] == ids[selected]) and np.all(masked[~selected] == ids[~selected])
    assert abs(selected[1:n + 1].mean() - 0.15) < 0.01
    sel_masked, sel_orig = masked[selected], ids[selected]
    frac_mask = np.mean(sel_masked == tok.mask_id)
    frac_random = np.mean((sel_masked != tok.mask_id) & (sel_masked != sel_orig))
    frac_same = np.mean(sel_masked == sel_orig)
    assert abs(frac_mask - 0.8) < 0.03 and abs(frac_random - 0.1) < 0.03
    assert abs(frac_same - 0.1) < 0.03
    randoms = sel_masked[sel_masked != tok.mask_id]
    assert randoms.min() >= tok.first_regular_id and randoms.max() < tok.vocab_size


def test_mlm_masking_never_selects_more_than_the_models_cap(tmp_path):
    """With model.mlm_max_predictions = K the model scores the first K selections of a row:
    the masking must change no token beyond those (here at p = 0.5, well past K on average)."""
    tok = _stats_tokenizer(tmp_path)
    body = np.random.default_rng(1).integers(tok.first_regular_id, tok.vocab_size, 34)
    ids = tf.constant(np.concatenate([[tok.cls_id], body, [tok.sep_id]]), tf.int32)
    for position in range(200):
        key = ip.example_seed(0, position)
        full_masked, full_labels = (x.numpy() for x in ip.mask_tokens(ids, key, tok, 0.5))
        masked, labels = (x.numpy() for x in ip.mask_tokens(ids, key, tok, 0.5, max_selected=4))
        kept = np.flatnonzero(full_labels >= 0)[:4]  # The first K of the uncapped selection.
        np.testing.assert_array_equal(np.flatnonzero(labels >= 0), kept)
        np.testing.assert_array_equal(masked[kept], full_masked[kept])
        untouched = np.ones(len(labels), bool)
        untouched[kept] = False
        np.testing.assert_array_equal(masked[untouched], ids.numpy()[untouched])


def test_mrm_masking_statistics():
    selected, zero = (x.numpy() for x in vi.mask_patches(20000, ip.example_seed(0, 3), 0.15))
    assert abs(selected.mean() - 0.15) < 0.01
    assert np.all(zero <= selected) and abs(zero.sum() / selected.sum() - 0.9) < 0.03


def test_masks_depend_only_on_seed_and_position(tmp_path):
    tok = _stats_tokenizer(tmp_path)
    ids = tf.constant([tok.cls_id] + list(range(10, 210)) + [tok.sep_id], tf.int32)

    def masks(seed, position):
        key = ip.example_seed(seed, position)
        return np.concatenate([ip.mask_tokens(ids, key, tok, 0.15)[1].numpy(),
                               vi.mask_patches(200, key, 0.15)[0].numpy()])

    np.testing.assert_array_equal(masks(0, 5), masks(0, 5))
    assert not np.array_equal(masks(0, 5), masks(0, 6))
    assert not np.array_equal(masks(0, 5), masks(1, 5))
    assert not np.array_equal(masks(0, 2**33), masks(0, 2**33 + 1))


# ------------------------------------------------------------------ resume
def test_resume_replays_identical_batches(config, workdir, train_batches):
    for start in (3, 11, 12):  # In epoch 0, across the epoch boundary, at the start of epoch 1.
        iterator = train_iterator(config, workdir, start_step=start)
        resumed = list(itertools.islice(iterator, 2))
        for got, want in zip(resumed, train_batches[start:start + 2]):
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # The second epoch is a different order of the same examples.
    assert not np.array_equal(train_batches[0]["image"], train_batches[12]["image"])


def test_every_epoch_is_a_new_permutation_of_the_host_slice(data_dir, split_rows):
    builder = tfds.builder("tfds_product1m/synthetic_tiny", data_dir=str(data_dir))
    features = builder.info.features
    hosts = []
    for split in tfds.even_splits("train", n=2, drop_remainder=True):
        records = ip.train_records(builder, split, seed=0, buffer=16, start=0).take(3 * 48)
        ids = [features.deserialize_example_np(r)["id"].decode()
               for _, r in records.as_numpy_iterator()]
        epochs = [ids[i * 48:(i + 1) * 48] for i in range(3)]
        assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == 48 for e in epochs)
        assert epochs[0] != epochs[1] != epochs[2]
        resumed = ip.train_records(builder, split, seed=0, buffer=16, start=50).take(10)
        assert [p for p, _ in resumed.as_numpy_iterator()] == list(range(50, 60))
        assert [features.deserialize_example_np(r)["id"].decode()
                for _, r in resumed.as_numpy_iterator()] == ids[50:60]
        hosts.append(set(epochs[0]))
    assert not hosts[0] & hosts[1] and hosts[0] | hosts[1] == {r[0] for r in split_rows["train"]}


def test_train_batch_must_divide_over_processes(config, tokenizer, monkeypatch):
    builder = ip.get_builder(config)
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        ip.create_train_iterator(config, builder, tokenizer, start_step=0)


# ------------------------------------------------------------------ eval
def test_eval_dataset_pads_last_batch(config, workdir, split_rows, tokenizer):
    ds = eval_dataset(config, workdir, "dev")
    batches = list(ds)
    assert len(batches) == len(ds) == 4  # 16 rows, batches of 5.
    expected = {r[0]: r for r in split_rows["dev"]}
    seen = []
    for batch, item_ids, labels, titles in batches:
        assert len(titles) == len(item_ids) and all(isinstance(t, str) for t in titles)
        assert batch["valid"].shape == (5,) and batch["valid"].dtype == np.int32
        assert batch["text_ids"].shape == (5, T) and batch["image"].shape == (5, SIZE, SIZE, 3)
        assert np.all(batch["mlm_labels"] == -1) and not batch["mrm_mask"].any()
        assert not batch["mrm_zero"].any() and "item_id" not in batch and "labels" not in batch
        for valid, item_id, row_labels, ids in zip(batch["valid"], item_ids, labels,
                                                   batch["text_ids"]):
            if valid:
                _, title, want_labels = expected[item_id]
                assert row_labels == want_labels and all(isinstance(s, str) for s in row_labels)
                want_ids = tokenizer.encode(tf.constant([title]))[0].numpy()[0]
                np.testing.assert_array_equal(ids, want_ids)  # Unmasked text.
                seen.append(item_id)
            else:
                assert item_id == "" and row_labels == []
    assert batches[-1][0]["valid"].tolist() == [1, 0, 0, 0, 0]
    assert sorted(seen) == sorted(expected) and len(set(seen)) == 16
    assert any(len(set(r[2])) < len(r[2]) for r in split_rows["dev"])  # Duplicates were kept.


def test_eval_every_host_runs_the_same_number_of_batches(config, workdir, monkeypatch):
    config = ml_collections.ConfigDict(config.to_dict())
    config.vocab_path, config.eval_batch_size = vocab_file(config, workdir), 4
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    ids, lengths = [], []
    for pid in range(3):  # 16 dev rows over 3 hosts: 6, 5, 5 -> 2 batches of 4 on every host.
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        batches = list(eval_dataset(config, workdir, "dev"))
        lengths.append(len(batches))
        ids += [i for b, item_ids, *_ in batches for i, v in zip(item_ids, b["valid"]) if v]
    assert lengths == [2, 2, 2] and len(ids) == len(set(ids)) == 16


# ------------------------------------------------------------------ errors and jax
def test_unbuilt_real_dataset_and_unknown_split_are_clear_errors(data_dir, tmp_path, workdir):
    config = make_config(tmp_path, **{"dataset.name": "tfds_product1m/full"})
    config.vocab_path = vocab_file(make_config(data_dir), workdir)
    with pytest.raises(FileNotFoundError, match="is not built in .*run `tfds build tfds_product1m"):
        eval_dataset(config, workdir, "dev")
    with pytest.raises(ValueError, match="Split 'validation' is not in"):
        eval_dataset(make_config(data_dir), workdir, "validation")


def test_make_global_batch_on_fake_devices(train_batches):
    mesh = jax.make_mesh((1, 8), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    batch = ip.make_global_batch(train_batches[0], sharding)
    assert batch.keys() == train_batches[0].keys()
    for key, array in batch.items():
        assert isinstance(array, jax.Array) and array.sharding == sharding
        assert array.shape == train_batches[0][key].shape and len(array.addressable_shards) == 8
        assert array.addressable_shards[0].data.shape[0] == BATCH // 8
        np.testing.assert_array_equal(np.asarray(array), train_batches[0][key])
    half = {k: v[:4] for k, v in train_batches[0].items()}
    with pytest.raises(ValueError, match="multiple of 8"):
        ip.make_global_batch(half, sharding)


def test_device_prefetch_keeps_order_raises_errors_in_place_and_stops():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    local = [{"x": np.full((8, 2), i, np.float32)} for i in range(5)]

    def source(fail_at=None):
        for i, batch in enumerate(local):
            if i == fail_at:
                raise RuntimeError(f"bad record {i}")
            yield batch

    for size in (0, 2):
        batches = list(ip.DevicePrefetch(source(), sharding, size))
        assert [int(b["x"][0, 0]) for b in batches] == [0, 1, 2, 3, 4]
        assert all(b["x"].sharding == sharding for b in batches)
    prefetch = ip.DevicePrefetch(source(fail_at=3), sharding, 2)
    assert [int(next(prefetch)["x"][0, 0]) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="bad record 3"):
        next(prefetch)
    with pytest.raises(ValueError, match="multiple of 8"):  # make_global_batch's own error
        next(ip.DevicePrefetch(iter([{"x": np.zeros((4, 2))}]), sharding, 2))
    endless = ip.DevicePrefetch(itertools.cycle(local), sharding, 2)
    next(endless)
    endless.close()
    for thread in threading.enumerate():
        if thread.name == "device_prefetch":
            thread.join(timeout=10)
    assert not any(t.name == "device_prefetch" for t in threading.enumerate())
    with pytest.raises(StopIteration):
        next(endless)


def test_train_iterator_rejects_a_host_outside_the_run(data_dir, workdir):
    with pytest.raises(ValueError, match="process_index 2 is not in"):
        train_iterator(make_config(data_dir), workdir, process_index=2, process_count=2)
