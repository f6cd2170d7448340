"""The trainer on `tiny` + `synthetic_tiny`: resume equivalence, meshes, errors, NaN, main.py."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from tfds_product1m import tfds_product1m_dataset_builder  # noqa: F401  (registers the builder)
from capture_jax import checkpointing, evaluators, experiment, train, vocab
from configs import capture as capture_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("tfds_product1m/synthetic_tiny", data_dir=path).download_and_prepare()
    return path


def tiny_config(data_dir, **changes):
    config = capture_configs.get_config("tiny")
    config.dataset.data_dir = data_dir
    config.evals.retrieval.every = -1  # Retrieval is tested on its own; here only training.
    config.log_every = 1
    config.update(changes)
    return config


def _checkpoint(workdir, step):
    """The raw arrays saved at `step` (model and optimiser), keyed by path."""
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(), opt=ocp.args.StandardRestore()))
    return {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(
        {"model": restored["model"], "opt": restored["opt"]})}


def test_is_due():
    assert [s for s in range(0, 11) if train.is_due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(0, 11) if train.is_due(s, 0, 10)] == [10]
    assert not train.is_due(0, 1, 10)
    assert [s for s in range(0, 7) if train.is_due(s, 3)] == [3, 6]


def test_resume_is_bit_identical_to_an_uninterrupted_run(data_dir, tmp_path, caplog):
    straight = train.train_and_evaluate(tiny_config(data_dir), str(tmp_path / "straight"))
    assert straight["step"] == 6 and straight["finished"]
    first = train.train_and_evaluate(tiny_config(data_dir, halt_after_step=3), str(tmp_path / "split"))
    assert first["step"] == 3 and not first["finished"]
    second = train.train_and_evaluate(tiny_config(data_dir), str(tmp_path / "split"))
    assert second["step"] == 6
    # The resumed run logged the same losses for steps 4..6 as the uninterrupted one.
    assert [h["loss"] for h in second["history"]] == [h["loss"] for h in straight["history"][3:]]
    a, b = _checkpoint(str(tmp_path / "straight"), 6), _checkpoint(str(tmp_path / "split"), 6)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
    losses = [h["loss"] for h in straight["history"]]
    assert losses[-1] < losses[0]  # It learns: the loss falls over six steps.
    for name in ("config.json", "vocab.txt"):
        assert os.path.exists(tmp_path / "straight" / name)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "straight"))
    # An already finished workdir says so and trains nothing.
    with caplog.at_level("INFO"):
        done = train.train_and_evaluate(tiny_config(data_dir), str(tmp_path / "straight"))
    assert done["step"] == 6 and done["finished"] and not done["history"]
    assert "Nothing to train: the checkpoint is at step 6 of 6 (the run is complete)" in caplog.text
    # A checkpoint past a lowered num_train_steps is complete too, not "halted".
    caplog.clear()
    with caplog.at_level("INFO"):
        past = train.train_and_evaluate(tiny_config(data_dir, num_train_steps=4),
                                        str(tmp_path / "straight"))
    assert past["step"] == 6 and past["finished"] and not past["history"]
    assert ("Run summary (tiny): already complete: the checkpoint is at step 6 and "
            "num_train_steps is 4") in caplog.text
    assert "halted" not in caplog.text


def _first_losses(data_dir, workdir, devices=None, **changes):
    config = tiny_config(data_dir, halt_after_step=2, checkpoint_every=0, **changes)
    return [h["loss"] for h in train.train_and_evaluate(config, workdir, devices)["history"]]


@pytest.fixture(scope="module")
def single_device_losses(data_dir, tmp_path_factory):
    return _first_losses(data_dir, str(tmp_path_factory.mktemp("one")), jax.devices()[:1],
                         mesh={"data": 1})


@pytest.mark.parametrize("mesh,rules", [({"data": 8}, "dp"), ({"data": 4, "model": 2}, "tp"),
                                        ({"data": 2, "fsdp": 4}, "fsdp")],
                         ids=["data8", "data4_model2", "fsdp"])
def test_first_losses_match_a_single_device(data_dir, tmp_path, single_device_losses, mesh, rules):
    sharded = _first_losses(data_dir, str(tmp_path), mesh=dict(mesh), sharding_rules=rules)
    assert len(sharded) == 2
    np.testing.assert_allclose(sharded, single_device_losses, rtol=2e-5)


def test_config_mistakes_are_one_clear_sentence(data_dir, tmp_path):
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        train.train_and_evaluate(tiny_config(data_dir, mesh={"data": -1, "model": 3}), str(tmp_path))
    with pytest.raises(ValueError, match="global_batch_size 6 does not divide over the 8"):
        train.train_and_evaluate(tiny_config(data_dir, global_batch_size=6), str(tmp_path))


def test_a_non_finite_loss_stops_without_saving(data_dir, tmp_path):
    config = tiny_config(data_dir)
    config.loss.mlm_weight = float("nan")
    with pytest.raises(FloatingPointError, match="at step 1; stopped without saving"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path / "checkpoints")


def test_start_from_bert_loads_its_text_stream_and_vocabulary(data_dir, tmp_path):
    from test_convert import BERT, random_bert, write_bert  # A tiny random Hugging Face BERT.

    weights = random_bert()
    bert_dir = write_bert(tmp_path / "bert", weights)
    reserved = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    cjk = [chr(0x4E00 + i) for i in range(BERT["vocab_size"] - len(reserved))]
    (tmp_path / "bert" / "vocab.txt").write_text("".join(t + "\n" for t in reserved + cjk))
    config = tiny_config(data_dir, vocab_pad_multiple=1)
    config.model.update(max_text_positions=BERT["max_position_embeddings"])
    config.model.text.num_layers = 4
    config.init_from.bert = bert_dir
    exp = experiment.setup(config, str(tmp_path / "w"))
    assert exp.config.vocab_path == os.path.join(bert_dir, "vocab.txt")
    assert exp.tokenizer.vocab_size == BERT["vocab_size"]
    manager = checkpointing.create_manager(str(tmp_path / "w"))
    state, step, origin, _ = train.restore_or_initialize(exp, manager)
    assert step == 0 and origin.startswith("text stream from BERT")
    np.testing.assert_array_equal(state.model["text_embeddings"]["word_embeddings"]["embedding"][...],
                                  weights["bert.embeddings.word_embeddings.weight"])
    config.init_from.checkpoint = str(tmp_path)
    with pytest.raises(ValueError, match="not both"):
        experiment.resolve_init(config)


TOY_EVALUATOR = '''"""A user's own evaluator: the step times `scale`; whether the parameters are finite."""
import jax
import numpy as np


class Evaluator:
    def __init__(self, experiment, *, scale):
        self.scale = scale

    def evaluate(self, model_state, step):
        leaves = [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(model_state)]
        yield "scaled_step", self.scale * step
        yield "finite_params", float(all(np.isfinite(x).all() for x in leaves))
'''


def _written_scalars(workdir, prefix):
    """{(step, tag): value} of the TensorBoard scalars under `prefix` in `workdir`'s event files."""
    import tensorflow as tf

    found = {}
    for name in os.listdir(workdir):
        if name.startswith("events.out.tfevents"):
            for record in tf.data.TFRecordDataset(os.path.join(workdir, name)):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    if value.tag.startswith(prefix):
                        found[event.step, value.tag] = float(tf.make_ndarray(value.tensor))
    return found


def test_config_declared_evaluator_runs_and_the_tokenizer_loads_once(data_dir, tmp_path,
                                                                      monkeypatch):
    """A new evaluator is a config entry and a module; train.py is not touched."""
    (tmp_path / "my_evals").mkdir()
    (tmp_path / "my_evals" / "__init__.py").write_text("")
    (tmp_path / "my_evals" / "toy.py").write_text(TOY_EVALUATOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    loads, real_init = [], vocab.Tokenizer.__init__

    def counting_init(self, *args, **kwargs):
        loads.append(args)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(vocab.Tokenizer, "__init__", counting_init)
    config = tiny_config(data_dir)
    config.evals.retrieval.update(every=0, feature_kinds=("joint",), report_queries=0)
    config.evals.toy = dict(type="my_evals.toy", every=4, scale=2.5)
    workdir = str(tmp_path / "w")
    result = train.train_and_evaluate(config, workdir)
    assert len(loads) == 1  # Vocabulary learned and tokenizer loaded once; training and eval share it.
    assert result["scores"][4] == {"toy/scaled_step": 10.0, "toy/finite_params": 1.0}
    assert result["scores"][6]["toy/scaled_step"] == 15.0  # And at the end.
    assert "retrieval/dev/joint/mAP@10" in result["scores"][6]
    written = _written_scalars(workdir, "toy/")
    assert written == {(4, "toy/scaled_step"): 10.0, (4, "toy/finite_params"): 1.0,
                       (6, "toy/scaled_step"): 15.0, (6, "toy/finite_params"): 1.0}


@pytest.mark.parametrize("entry,message", [
    (dict(type="no_such_evaluator", every=0), "there is no module capture_jax.evaluators.no_such"),
    (dict(type="retrieval"), "lacks \\['every'\\]"),
    (dict(type="my_evals.toy", every=0, scale=1, colour="red"), "fields \\['colour'\\] that"),
    (dict(type="my_evals.toy", every=0), "lacks the fields \\['scale'\\]"),
])
def test_evaluator_config_mistakes_are_one_sentence(tmp_path, monkeypatch, entry, message):
    import types

    import ml_collections

    (tmp_path / "my_evals").mkdir()
    (tmp_path / "my_evals" / "__init__.py").write_text("")
    (tmp_path / "my_evals" / "toy.py").write_text(TOY_EVALUATOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = ml_collections.ConfigDict({"evals": {"bad": entry}})
    with pytest.raises(ValueError, match=f"config.evals.bad.*{message}"):
        evaluators.create(types.SimpleNamespace(config=config))


def _start_main(workdir, data_dir, *overrides):
    cmd = [sys.executable, "main.py", "--config", "configs/capture.py:tiny", "--workdir", workdir,
           f"--config.dataset.data_dir={data_dir}", "--config.evals.retrieval.every=-1",
           *overrides]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_main_sigterm_saves_the_current_step_and_the_next_start_resumes(data_dir, tmp_path,
                                                                        caplog):
    workdir = str(tmp_path / "run")
    proc = _start_main(workdir, data_dir, "--config.num_train_steps=100000",
                       "--config.checkpoint_every=0", "--config.log_every=1")
    lines, deadline = [], time.time() + 240
    for line in proc.stdout:  # Wait until training is under way.
        lines.append(line)
        if "step 3/100000" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    steps = ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps()
    assert len(steps) == 1 and steps[0] >= 3, out[-3000:]
    assert f"saved step {steps[0]}; exiting" in out
    resumed = _start_main(workdir, data_dir, "--config.num_train_steps=100000",
                          f"--config.halt_after_step={steps[0] + 1}")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert f"resumed at step {steps[0]}" in out
    assert steps[0] + 1 in ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps()
    _check_log_reads_well(out, steps[0] + 1)
    assert f"halted after step {steps[0] + 1} (halt_after_step)" in out
    with caplog.at_level(logging.INFO):  # The same again, in this process (a start costs 12 s).
        again = train.train_and_evaluate(
            tiny_config(data_dir, num_train_steps=100000, halt_after_step=steps[0] + 1), workdir)
    assert again["step"] == steps[0] + 1 and not again["history"]
    assert (f"Nothing to train: the checkpoint is at step {steps[0] + 1} and halt_after_step is "
            f"{steps[0] + 1}; rerun with --config.halt_after_step=-1") in caplog.text
    # --mode=evaluate scores the latest checkpoint and writes the official files.
    cmd = [sys.executable, "main.py", "--config", "configs/capture.py:tiny", "--workdir", workdir,
           f"--config.dataset.data_dir={data_dir}", "--mode=evaluate"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for split in ("dev", "test"):
        kind_dir = os.path.join(workdir, "retrieval", split, "joint")
        with open(os.path.join(kind_dir, "retrieval_id_list.txt")) as f:
            lines = f.read().splitlines()
        assert len(lines) == 16 and all(len(line.split(",")) > 1 for line in lines)
        with open(os.path.join(kind_dir, "metric_results.json")) as f:
            scores = json.load(f)
        assert list(scores) == ["top10", "top50", "top100"]
        assert all(0 <= v <= 1 for s in scores.values() for v in s.values())  # Fractions.
        assert os.path.getsize(os.path.join(kind_dir, "report.html")) > 1000
    assert os.path.isfile(os.path.join(workdir, "retrieval", "index.html"))
    assert "retrieval dev at step" in result.stderr and "tfidf" in result.stderr


def _check_log_reads_well(out: str, last_step: int) -> None:
    """What a user reads: no start-up noise, each metric once, a compile line, a line per
    checkpoint, and the summary block."""
    for noise in ("cuInit", "cudart_stub", "oneDNN", "os.fork()", "has no dataset_info.json",
                  "absl::InitializeLog", "logging_writer.py", "steps_per_sec", "uptime"):
        assert noise not in out, noise
    step_lines = [line for line in out.splitlines() if f"step {last_step}/100000:" in line]
    assert len(step_lines) == 1 and step_lines[0].count("loss_clr ") == 1
    assert "ETA " in step_lines[0]
    assert "Compiling the train step" in out and "(compilation included)" in out
    assert f"Checkpoint of step {last_step}: " in out
    summary = out[out.index("Run summary (tiny)"):]
    for part in ("steps ", "wall time", "checkpoints", "tensorboard --logdir"):
        assert part in summary, part


def test_main_reports_missing_real_data_in_one_sentence(tmp_path):
    cmd = [sys.executable, "main.py", "--config", "configs/capture.py:paper_pixels",
           "--workdir", str(tmp_path / "w"), f"--config.dataset.data_dir={tmp_path / 'empty'}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "tfds build tfds_product1m --config=full" in last and "configs/capture.py:demo" in last
