"""`python -m tfds_product1m.download` against a real HTTP server on 127.0.0.1 (no internet).

The server (tests/loopback_images.py) serves a synthetic Product1M's images on two hosts and, for
chosen ids, fails the way image hosts do. Checked: each reachable id is saved once, every failure
is counted under its reason, a rerun requests no saved id, a killed run resumes to the same files,
and `--config=full` builds from the result with the counts the downloader reported.
"""

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tfds_product1m import tfds_product1m_dataset_builder  # noqa: F401  (registers the builder)
from capture_jax import cli
from loopback_images import ImageServer
from tfds_product1m import download
from tfds_product1m import product1m_files as files
from tfds_product1m import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = synthetic.SyntheticSpec(num_products=4, num_train=12, gallery_per_product=2, num_dev=4,
                               num_test=4, image_size=64, dirty=False)
FAST = download.Options(processes=1, threads=4, timeout=1.0, retries=1, backoff=0.1,
                        shard_size=100)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A synthetic Product1M: {id: JPEG bytes} and its text files' directory."""
    root = tmp_path_factory.mktemp("source")
    synthetic.write_product1m(root, SPEC)
    index, _ = files.index_images(root)
    return {i: pathlib.Path(p).read_bytes() for i, p in index.items()}, root


def official_files(source_root, server, out_dir):
    """The official text files with both URL columns pointing at `server` (hosts a and b)."""
    out_dir.mkdir()
    for split in files.SPLITS:
        text = (source_root / files.split_filename(split)).read_text(encoding="utf-8")
        text = text.replace("https://img-a.example/", f"http://127.0.0.1:{server.port}/a/")
        text = text.replace("https://img-b.example/p1m/", f"http://127.0.0.1:{server.port}/b/")
        (out_dir / files.split_filename(split)).write_text(text, encoding="utf-8")
    return out_dir


def saved_images(out):
    index, duplicates = files.index_images(os.path.join(out, "images"))
    assert duplicates == 0
    return {i: pathlib.Path(p).read_bytes() for i, p in index.items()}


def test_every_id_saved_once_failures_counted_rerun_requests_nothing_saved(source, tmp_path):
    images, source_root = source
    ids = sorted(images)
    plans = {  # (host, id) -> what that URL does; unlisted URLs answer 200.
        ("a", ids[0]): "access_denied",                                # url2 saves it
        ("a", ids[1]): "not_found", ("b", ids[1]): "not_found",        # fails: http_404
        ("a", ids[2]): "slow", ("b", ids[2]): "slow",                  # fails: timeout (retried)
        ("a", ids[3]): "truncated",                                    # url2 saves it
        ("a", ids[4]): "html", ("b", ids[4]): "html",                  # fails: not_an_image
        ("a", ids[5]): "png", ("a", ids[6]): "cmyk", ("a", ids[7]): "redirect",
        ("a", ids[8]): "flaky", ("b", ids[8]): "not_found",            # the retry round saves it
        ("a", ids[9]): "tiny", ("b", ids[9]): "tiny",                  # fails: too_small
    }
    out = str(tmp_path / "out")
    with ImageServer(images, plans, slow_s=2.5) as server:
        official = official_files(source_root, server, tmp_path / "official")
        report = download.download(str(official), out, list(files.SPLITS), FAST)

        failed = {ids[1]: "http_404", ids[2]: "timeout", ids[4]: "not_an_image",
                  ids[9]: "too_small"}
        saved = saved_images(out)
        assert sorted(saved) == sorted(set(ids) - set(failed))
        for item_id in set(saved) - {ids[5], ids[6]}:
            assert saved[item_id] == images[item_id]  # Byte for byte as served.
        assert Image.open(pathlib.Path(out, "images", ids[5][-3:], f"{ids[5]}.jpg")).format == "PNG"
        assert Image.open(pathlib.Path(out, "images", ids[6][-3:], f"{ids[6]}.jpg")).mode == "CMYK"
        for item_id in set(ids) - set(plans_ids(plans)):
            assert server.requests_for(item_id) == 1, item_id  # Saved once, requested once.
        assert server.requests[f"/b/{ids[0]}.jpg"] == 1 and server.requests[f"/a/{ids[8]}.jpg"] == 2
        assert all(download.USER_AGENT_TOKEN in ua for ua in server.user_agents)

        total = report["total"]
        assert total["rows"] == len(ids) and total["saved"] == len(ids) - len(failed)
        assert total["saved_url2"] == 2 and total["saved_url1"] == len(ids) - len(failed) - 2
        assert total["failed_by_reason"] == {"http_404": 1, "not_an_image": 1, "timeout": 1,
                                             "too_small": 1}
        assert total["failed_by_url_reasons"]["url1 http_404, url2 http_404"] == 1
        assert [p["name"] for p in report["passes"]] == ["url1", "url2", "retry1"]
        assert report["passes"][0]["failed"] == {
            "http_403": 1, "http_404": 1, "timeout": 1, "truncated": 1, "not_an_image": 1,
            "http_503": 1, "too_small": 1}
        assert report["passes"][2]["requested"] == 2  # The 503 and the timeout, not the 404s.
        tsv = pathlib.Path(out, download.FAILED_FILE).read_text().splitlines()
        assert len(tsv) == 1 + len(failed)
        for line in tsv[1:]:
            split, item_id, reason, _ = line.split("\t")
            assert item_id in failed and reason.endswith(failed[item_id]), line
        assert not os.listdir(os.path.join(out, download.STAGING_DIR))

        before = dict(server.requests)
        again = download.download(str(official), out, list(files.SPLITS),
                                  dataclasses.replace(FAST, retries=0))
        asked = {path for path, n in server.requests.items() if n != before.get(path, 0)}
        assert {p.rsplit("/", 1)[-1][:-4] for p in asked} == set(failed)  # Saved ids: no request.
        assert again["total"]["saved_before"] == len(ids) - len(failed)
        assert saved_images(out) == saved

    builder = tfds.builder("tfds_product1m/full", data_dir=str(tmp_path / "data"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=out))
    for split, counts in report["splits"].items():
        assert builder.info.splits[split].num_examples == counts["saved"], split


def plans_ids(plans):
    return {item_id for _, item_id in plans}


def test_a_killed_download_resumes_to_the_same_files(source, tmp_path):
    images, source_root = source
    out = tmp_path / "out"
    with ImageServer(images, delay_s=0.25) as server:
        official = official_files(source_root, server, tmp_path / "official")
        command = [sys.executable, "-m", "tfds_product1m.download", f"--official_dir={official}",
                   f"--out={out}", "--processes=1", "--threads=1", "--timeout=5", "--retries=0"]
        run = subprocess.Popen(command, cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            while len(list(out.glob(".staging/*/shards/*/*.json"))) < 6:
                assert run.poll() is None and time.time() < deadline, "no images before the kill"
                time.sleep(0.05)
        finally:
            os.killpg(run.pid, signal.SIGKILL)  # The whole run: img2dataset's workers too.
            run.wait()
        assert not list(out.glob("images/*/*.jpg"))  # Still in staging when killed.

        resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "next: tfds build tfds_product1m --config=full" in resumed.stdout
        assert saved_images(out) == images  # Every image, whole.
        assert not list(out.glob("images/*/*.partial-*"))
        # Images saved before the kill were collected, not requested again (one in flight may be).
        assert sum(server.requests.values()) <= len(images) + 1
        assert max(server.requests.values()) <= 2


def test_bad_input_is_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match=r"error: --official_dir .* is not a directory"):
        cli.call(download, [f"--official_dir={tmp_path / 'nowhere'}", f"--out={tmp_path / 'o'}"])
    with pytest.raises(SystemExit, match=r"has no product1m_dev_ossurl_v2.txt: point"):
        cli.call(download, [f"--official_dir={tmp_path}", f"--out={tmp_path / 'o'}",
                            "--splits=dev"])
    with pytest.raises(SystemExit):
        cli.call(download, [f"--official_dir={tmp_path}", f"--out={tmp_path / 'o'}",
                            "--splits=valid"])
    assert download.classify("failed_to_download", "HTTP Error 429: Too Many Requests") == \
        "http_429"
    assert download.RETRYABLE.match("http_429") and not download.RETRYABLE.match("http_404")
