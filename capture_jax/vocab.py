"""The text vocabulary and tokenizer: a bert-base-chinese style WordPiece `vocab.txt`, given or
learned once from the train titles, and `Tokenizer`, which turns titles into model ids in tf.data.

A learned vocabulary is written to `workdir/vocab.txt` by process 0 and reused by every later run
in that workdir (a resumed or evaluation run must see the ids the model was trained with).
"""

from __future__ import annotations

import collections.abc
import os

import jax
import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text
from tensorflow_text.python.ops.bert_tokenizer import BasicTokenizer
from tensorflow_text.tools.wordpiece_vocab import bert_vocab_from_dataset as bert_vocab

from capture_jax import input_pipeline

RESERVED_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 of a learned vocab

# The CJK ideograph ranges that BERT's basic tokenizer splits into single characters.
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def is_cjk(char: str) -> bool:
    """Whether `char` is a CJK ideograph (one token each, as in bert-base-chinese)."""
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def learn_vocab(titles: collections.abc.Iterable[str], vocab_size: int) -> list[str]:
    """A WordPiece vocab (RESERVED_TOKENS first) plus every CJK character of `titles`."""
    titles = [t.encode() for t in titles]
    if not titles:
        raise ValueError("No titles to learn a vocabulary from: set --config.vocab_path instead.")
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(titles, tf.string)).batch(1024)
    vocab = bert_vocab.bert_vocab_from_dataset(
        ds, vocab_size=vocab_size, reserved_tokens=list(RESERVED_TOKENS),
        bert_tokenizer_params={"lower_case": True}, learn_params={})
    # Words as the tokenizer sees them (case-folded, NFD, accents stripped); CJK come out single.
    chars = set()
    for words in ds.map(BasicTokenizer(lower_case=True).tokenize):
        chars.update(w.decode() for w in np.unique(words.flat_values.numpy()))
    chars = {c for c in chars if len(c) == 1 and is_cjk(c)}
    rest = [t for t in vocab if t not in RESERVED_TOKENS]
    return list(RESERVED_TOKENS) + rest + sorted(chars - set(rest))


def vocab_file(config, workdir: str, builder) -> str:
    """The vocab file to use: `config.vocab_path`, else workdir/vocab.txt (learned once from the
    train titles of `builder`, then reused)."""
    if config.vocab_path:
        if not tf.io.gfile.exists(config.vocab_path):
            raise FileNotFoundError(
                f"Vocabulary file {config.vocab_path} does not exist: set --config.vocab_path to a "
                "bert-base-chinese style vocab.txt, or to None to learn one from the train titles.")
        return config.vocab_path
    path = os.path.join(workdir, "vocab.txt")

    def write():
        if tf.io.gfile.exists(path):
            return  # Resumed / evaluation run: the model's ids are tied to this file.
        titles = input_pipeline.read_titles(builder, config.dataset.train_split)
        vocab = learn_vocab(titles, config.vocab_size)
        tf.io.gfile.makedirs(workdir)
        tmp = f"{path}.tmp-{jax.process_index()}"
        with tf.io.gfile.GFile(tmp, "w") as f:
            f.write("".join(t + "\n" for t in vocab))
        tf.io.gfile.rename(tmp, path, overwrite=True)  # Atomic: readers see no half file.

    input_pipeline.on_process_0("capture_vocab", write)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path} was not written by process 0: put the workdir on a filesystem that all "
            "hosts share, or pass --config.vocab_path.")
    return path


class Tokenizer:
    """`[CLS] wordpieces [SEP]` padded with [PAD] to `max_len`, as tf ops (FastBertTokenizer).

    Lower-cases, strips accents and splits every CJK character into its own token, like
    bert-base-chinese. Special ids are looked up by token string, so both a learned vocab and
    the original 21,128-token bert-base-chinese vocab work.
    """

    def __init__(self, vocab_path: str, max_len: int):
        with tf.io.gfile.GFile(vocab_path) as f:
            self.vocab = [line.rstrip("\r\n") for line in f]
        index = {t: i for i, t in enumerate(self.vocab)}
        missing = [t for t in RESERVED_TOKENS if t not in index]
        if missing:
            raise ValueError(f"Vocabulary {vocab_path} lacks {missing}: use a BERT vocab.txt.")
        if max_len < 3:
            raise ValueError(f"model.text.length must be >= 3 (CLS, a token, SEP), got {max_len}.")
        self.max_len = max_len
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            index[t] for t in RESERVED_TOKENS)
        self.vocab_size = len(self.vocab)
        # Random MLM replacements skip the leading block of "[...]" tokens ([PAD], [unused*]...).
        self.first_regular_id = next(
            (i for i, t in enumerate(self.vocab) if not (t.startswith("[") and t.endswith("]"))),
            self.vocab_size)
        self._tokenizer = tf_text.FastBertTokenizer(
            vocab=self.vocab, lower_case_nfd_strip_accents=True, token_out_type=tf.int64)
        self._encode_graph = tf.function(self.encode,
                                         input_signature=[tf.TensorSpec([None], tf.string)])

    def encode(self, titles: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """[N] strings -> (ids int32 [N, T], mask int32 [N, T])."""
        tokens = self._tokenizer.tokenize(titles)[:, : self.max_len - 2]
        ids, _ = tf_text.combine_segments([tokens], self.cls_id, self.sep_id)
        ids, mask = tf_text.pad_model_inputs(ids, self.max_len, pad_value=self.pad_id)
        return tf.cast(ids, tf.int32), tf.cast(mask, tf.int32)

    def encode_titles(self, titles: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """`encode` of Python strings outside tf.data, as numpy: the same ops traced once into a
        graph (run eagerly they cost 15-30x more: the search server tokenises each query)."""
        ids, mask = self._encode_graph(tf.constant(titles, tf.string))
        return ids.numpy(), mask.numpy()

    def tokens(self, ids: collections.abc.Iterable[int]) -> list[str]:
        """Token strings of `ids` (for tests and debugging)."""
        return [self.vocab[int(i)] for i in ids]


def load_tokenizer(config, workdir: str, builder) -> Tokenizer:
    """The tokenizer of this run (learning its vocabulary first if needed); its `vocab_size` is
    the model's vocabulary size. `experiment.setup` calls this once per run."""
    return Tokenizer(vocab_file(config, workdir, builder), config.model.text.length)
