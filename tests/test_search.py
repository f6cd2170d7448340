"""python -m capture_jax.search on a trained `tiny` run over synthetic_tiny: the index ranks test
queries exactly as the evaluator did, a directory catalogue indexes like the built split, and a
real server on 127.0.0.1 answers concurrent requests and refuses every bad input in one sentence
(then serves again); the page is driven in headless Chromium."""

import base64
import concurrent.futures
import glob
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds
from PIL import Image

from capture_jax import cli, train
from capture_jax.search import __main__ as search_command
from capture_jax.search import catalogue, searcher
from configs import capture as capture_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step tiny run whose final evaluation wrote the test split's rankings (joint)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    workdir = str(tmp_path_factory.mktemp("run"))
    config = capture_configs.get_config("tiny")
    config.dataset.data_dir = data_dir
    config.evals.retrieval.update(feature_kinds=("joint",), baselines=(), report_queries=0,
                                  query_splits=("test",))
    train.train_and_evaluate(config, workdir)
    queries = tfds.builder(config.dataset.name, data_dir=data_dir).as_dataset(
        split="test", shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    queries = [(ex["id"].decode(), ex["title"].decode(), ex["image"])
               for ex in tfds.as_numpy(queries)]
    with open(os.path.join(workdir, "retrieval", "test", "joint", "retrieval_id_list.txt")) as f:
        ranked = {line.split(",")[0]: line.strip().split(",")[1:] for line in f}
    return workdir, data_dir, queries, ranked


@pytest.fixture(scope="module")
def index(trained, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("index"))
    cli.call(search_command, ["index", f"--workdir={trained[0]}", f"--out={path}"])
    return path


@pytest.fixture(scope="module")
def loaded(index):
    """The index and its model, compiled (shared: loading and compiling cost seconds)."""
    return searcher.Searcher(index)


def test_index_ranks_test_queries_as_the_evaluator(trained, index, loaded, tmp_path, capsys):
    workdir, _, queries, ranked = trained
    with open(os.path.join(index, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["variant"] == "tiny" and manifest["step"] == 6
    assert manifest["feature_kinds"] == ["joint"] and manifest["count"] == 72
    assert len(manifest["config_hash"]) == 12 and manifest["source"]["split"] == "gallery"
    s = loaded
    titled = [(qid, title, jpeg) for qid, title, jpeg in queries if title.strip()]
    assert len(titled) >= 12
    hits = s.search([s.prepare(jpeg, title) for _, title, jpeg in titled], k=100)
    for (qid, _, _), found in zip(titled, hits):
        assert [h["id"] for h in found] == ranked[qid], qid
    # The command as a user types it: the same list, as JSON.
    qid, title, jpeg = titled[0]
    (tmp_path / "q.jpg").write_bytes(jpeg)
    capsys.readouterr()
    cli.call(search_command, ["query", f"--index={index}", f"--image={tmp_path / 'q.jpg'}",
                              f"--title={title}", "--k=100", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert [h["id"] for h in printed] == ranked[qid]
    # Boxes: each crop is a query; an item keeps its best score over the crops.
    [merged] = s.search([s.prepare(jpeg, title, "0,0,60,60;30,30,96,96")], k=5)
    crops = [s.search([s.prepare(jpeg, title, box)], k=5)[0]
             for box in ("0,0,60,60", "30,30,96,96")]
    best = {}
    for crop, found in enumerate(crops, 1):
        for h in found:
            if h["id"] not in best or h["score"] > best[h["id"]][0]:
                best[h["id"]] = (h["score"], crop)
    want = sorted(best.items(), key=lambda kv: -kv[1][0])[:5]
    assert [(h["id"], h["box"]) for h in merged] == [(i, c) for i, (_, c) in want]


def test_query_rows_equal_the_evaluators_rows_bit_for_bit(trained, loaded):
    """A test picture and title make the rows the evaluator's input pipeline made (graphs and
    numpy here, tf.data there); odd titles tokenise as the pipeline tokenises them."""
    import tensorflow as tf

    from capture_jax import experiment, input_pipeline

    workdir, _, queries, _ = trained
    s = loaded
    exp = experiment.setup(s.model.config.copy_and_resolve_references(), workdir)
    jpegs = {qid: jpeg for qid, _, jpeg in queries}
    seen = 0
    for batch, ids, _, titles in input_pipeline.EvalDataset(exp.config, exp.builder,
                                                            exp.tokenizer, "test", 16):
        for row, (qid, title) in enumerate(zip(ids, titles)):
            if not title.strip():
                continue
            rows = s.prepare(jpegs[qid], title).rows
            for key in ("image", "text_ids", "text_mask"):
                np.testing.assert_array_equal(rows[key][0], batch[key][row], err_msg=key)
            seen += 1
    assert seen >= 12
    odd = ["ZIKE/姿珂 Crème Brûlée 口红 №5 ½ 😀 ,.!?", "a" * 400, "的" * 50, "  x  ", "£€¥ ＡＢＣ"]
    pipeline = tf.data.Dataset.from_tensor_slices(odd).map(
        lambda t: s.model.tokenizer.encode(t[None])).as_numpy_iterator()
    for (want_ids, want_mask), ids, mask in zip(pipeline, *s.model.tokenizer.encode_titles(odd)):
        np.testing.assert_array_equal(ids, want_ids[0])
        np.testing.assert_array_equal(mask, want_mask[0])


def test_a_directory_catalogue_indexes_like_the_built_split(trained, index, tmp_path):
    workdir, data_dir, _, _ = trained
    [raw] = glob.glob(os.path.join(data_dir, "downloads", "synthetic_raw", "*"))
    out = str(tmp_path / "from_dir")
    cli.call(search_command, ["index", f"--workdir={workdir}", f"--out={out}",
                              f"--catalogue={raw}", "--max_image_side=96"])
    built, from_dir = catalogue.Index(index), catalogue.Index(out)
    assert sorted(from_dir.ids) == sorted(built.ids)  # File order there, TFDS order here.
    order = [built.ids.index(i) for i in from_dir.ids]
    assert from_dir.titles == [built.titles[i] for i in order]
    np.testing.assert_allclose(from_dir.features["joint"], built.features["joint"][order],
                               atol=1e-5)
    assert from_dir.manifest["source"]["skipped"] == {"missing_image": 1, "bad_image": 1}


def test_wrong_model_or_missing_checkpoint_is_one_sentence(trained, index, tmp_path, capsys):
    qid, title, jpeg = trained[2][0]
    (tmp_path / "q.jpg").write_bytes(jpeg)
    for change, message in [({"config_hash": "0123456789ab"}, "made by another model"),
                            ({"step": 99}, "The checkpoint of step 99 is not in")]:
        other = tmp_path / f"index_{next(iter(change))}"
        shutil.copytree(index, other)
        manifest = json.loads((other / "manifest.json").read_text())
        (other / "manifest.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(SystemExit) as e:
            cli.call(search_command, ["query", f"--index={other}", "--title=x",
                                      f"--image={tmp_path / 'q.jpg'}"])
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------ the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(index):
    """`python -m capture_jax.search serve` in a subprocess: its base URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "capture_jax.search", "serve", f"--index={index}",
         f"--port={port}", "--batch_wait_ms=300"], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):  # Start-up: imports, the checkpoint, one compilation.
        if proc.poll() is not None:
            pytest.fail(f"the server stopped: {proc.stdout.read()[-3000:]}")
        try:
            if requests.get(url + "/api/info", timeout=2).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the server did not start in 2 minutes")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _post(url, image, title, **fields):
    files = {"image": ("q.jpg", image, "image/jpeg")} if image is not None else None
    return requests.post(url + "/api/search", files=files, data={"title": title, **fields},
                         timeout=120)


def _huge_png(width=10000, height=10000) -> bytes:
    """A PNG whose header claims width x height pixels (no pixel data to decode)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_server_answers_concurrent_requests_and_each_bad_input_in_one_sentence(trained,
                                                                                server):
    _, _, queries, ranked = trained
    titled = [(qid, title, jpeg) for qid, title, jpeg in queries if title.strip()][:8]
    with concurrent.futures.ThreadPoolExecutor(len(titled)) as pool:
        replies = list(pool.map(lambda q: _post(server, q[2], q[1], k="10"), titled))
    for (qid, _, _), reply in zip(titled, replies):
        assert reply.status_code == 200, reply.text
        assert [h["id"] for h in reply.json()["results"]] == ranked[qid][:10]
    batches = requests.get(server + "/api/info", timeout=10).json()["batches"]
    assert max(map(int, batches)) > 1, batches  # Requests that arrived together shared a call.
    qid, title, jpeg = titled[0]
    thumb = requests.get(server + replies[0].json()["results"][0]["thumbnail"], timeout=10)
    assert thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size[0] > 0
    bad = [
        (dict(image=b"title,labels\nnot a picture\n", title=title), 400, "not a picture"),
        (dict(image=jpeg[:len(jpeg) // 2], title=title), 400, "truncated or damaged"),
        (dict(image=_huge_png(), title=title), 413, "megapixels), over the limit of 40"),
        (dict(image=None, title=title), 400, "No picture was sent"),
        (dict(image=jpeg, title="   "), 400, "The title is empty"),
        (dict(image=jpeg, title="口红" * 200), 400, "over the limit of 300"),
        (dict(image=jpeg, title=title, boxes="10,10,200,50"), 400, "Box 1 (10,10,200,50) is "
         "not inside the 96x96 picture"),
        (dict(image=jpeg, title=title, boxes="1,2,3"), 400, "is not four numbers"),
        (dict(image=jpeg, title=title, kind="capture"), 400, "holds feature kinds ['joint']"),
        (dict(image=jpeg, title=title, k="many"), 422, "'k' is wrong"),
        (dict(image=jpeg, title=title, k="0"), 400, "k=0 is not between 1 and 100"),
    ]
    for fields, status, message in bad:
        reply = _post(server, fields.pop("image"), fields.pop("title"), **fields)
        assert reply.status_code == status, (message, reply.text)
        detail = reply.json()["detail"]
        assert isinstance(detail, str) and message in detail, detail
        assert detail.count(". ") == 0 and detail.endswith("."), detail  # One sentence.
    assert requests.get(server + "/api/items/999/thumbnail", timeout=10).status_code == 404
    good = _post(server, jpeg, title, k="3")  # And it still serves.
    assert good.status_code == 200 and [h["id"] for h in good.json()["results"]] == \
        ranked[qid][:3]


# ------------------------------------------------------------------------------ the page
class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe (Chromium reads commands
    on its fd 3 and answers on fd 4, one JSON message per NUL-terminated record)."""

    def __init__(self, chromium: str, profile: str):
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()

        def wire():
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1100,900",
             "about:blank"], pass_fds=(3, 4), preexec_fn=wire, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._id, self._buffer, self.session = 0, b"", None

    def send(self, method: str, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                data = os.read(self._in, 1 << 20)
                if not data:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += data
            record, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(record)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression,
                         returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, tries: int = 600):
        for _ in range(tries):
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"never true in the page: {expression}")

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        os.close(self._in)
        os.close(self._out)


def test_page_uploads_a_picture_and_shows_the_items(trained, server, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    _, _, queries, ranked = trained
    qid, title, jpeg = next(q for q in queries if q[1].strip())
    picture = tmp_path / "query.jpg"
    picture.write_bytes(jpeg)
    browser = DevTools(chromium, str(tmp_path / "profile"))
    try:
        target = browser.send("Target.createTarget", url=server + "/")["targetId"]
        browser.session = browser.send("Target.attachToTarget", targetId=target,
                                       flatten=True)["sessionId"]
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('go')")
        root = browser.send("DOM.getDocument")["root"]["nodeId"]
        node = browser.send("DOM.querySelector", nodeId=root, selector="#image")["nodeId"]
        browser.send("DOM.setFileInputFiles", nodeId=node, files=[str(picture)])
        browser.evaluate(f"document.getElementById('title').value = {json.dumps(title)}; "
                         "document.getElementById('go').click()")
        browser.wait_for("document.body.dataset.done === '1' && [...document.images]"
                         ".filter(i => i.closest('.hit')).every(i => i.complete)")
        shown = browser.evaluate("[...document.querySelectorAll('.hit')].map(h => "
                                 "h.children[2].textContent)")
        assert shown == ranked[qid][:10]
        widths = browser.evaluate("[...document.querySelectorAll('.hit img')].map(i => "
                                  "i.naturalWidth)")
        assert len(widths) == 10 and min(widths) > 0  # Thumbnails drew.
        png = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "page.png").write_bytes(png)
        if os.environ.get("SEARCH_SCREENSHOT"):  # A folder to keep the screenshot in.
            shutil.copy(tmp_path / "page.png", os.environ["SEARCH_SCREENSHOT"])
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels[::37], axis=0)) > 100  # Pictures, not a blank page.
        # A bad input shows its sentence in the page, which then searches again.
        browser.evaluate("document.body.dataset.done = ''; "
                         "document.getElementById('title').value = ''; "
                         "document.getElementById('go').click()")
        error = browser.wait_for("document.getElementById('error').textContent")
        assert error.startswith("The title is empty")
    finally:
        browser.close()
