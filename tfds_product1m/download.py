"""Downloads Product1M's images from the official URLs, into what `--config=full` reads.

    python -m tfds_product1m.download --official_dir DIR --out IMAGES
    tfds build tfds_product1m --config=full --manual_dir=IMAGES

Every row of the official files gives two URLs of one image. The download runs in passes, each an
img2dataset run (parallel processes and threads; Spark or Ray for many machines) over the ids
still missing: pass 1 with each row's first URL (`--first_url`), pass 2 with the other URL for the
rows that failed, then up to `--retries` rounds, `--backoff` seconds apart and doubling, for rows
whose last failure may pass (HTTP 429 and 5xx, timeouts, dropped connections).

Layout of IMAGES: the official text files (copied), `images/<last 3 id digits>/<id>.jpg`, the JSON
report `download_report.json` and `download_failed.tsv` (each failed id with its reason per URL).
img2dataset writes into `.staging/<run>-<pass>/`; only images that open (and are at least
`--min_side` pixels on their shorter side) are moved into `images/`, each by one atomic rename,
so a killed run never leaves half an image there. A rerun (or a run after a kill) first collects
what a killed run had saved in `.staging`, then requests only the ids not in `images/`.

Images are kept byte for byte as served (PNG named `.jpg`, CMYK, EXIF orientation: the builder
cleans them), unless `--max_side` asks for the builder's own cleaning here (upright RGB JPEG,
longer side at most that), which also saves disk.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from absl import flags, logging
from PIL import Image

from tfds_product1m import command_line as cli
from tfds_product1m import product1m_files as files

REPORT_FILE = "download_report.json"
FAILED_FILE = "download_failed.tsv"
STAGING_DIR = ".staging"
USER_AGENT_TOKEN = "capture_jax-product1m-downloader"
PASS_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "img2dataset_pass.py")
# Reasons a request may succeed later: tried again in the retry rounds.
RETRYABLE = re.compile(r"^(http_429|http_5\d\d|timeout|truncated|connection_error)$")


@dataclasses.dataclass(frozen=True)
class Options:
    processes: int = 1
    threads: int = 32
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 30.0
    max_side: int = 0  # 0: keep images as served.
    min_side: int = 16
    first_url: int = 1
    distributor: str = "multiprocessing"
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai")
    shard_size: int = 10000


def image_path(out: str, item_id: str) -> str:
    """Where `<id>.jpg` goes: a thousand folders, so none holds more than ~1,200 files."""
    return os.path.join(out, "images", item_id[-3:], f"{item_id}.jpg")


def classify(status: str, message: str | None) -> str:
    """img2dataset's status and error message as one reason: http_<code>, timeout, truncated,
    connection_error, disallowed_by_x_robots_tag, bad_url, not_an_image, or other."""
    message = message or ""
    if status == "success":
        return "saved"
    http = re.search(r"HTTP Error (\d{3})", message)
    if http:
        return f"http_{http.group(1)}"
    if "timed out" in message:
        return "timeout"
    if "IncompleteRead" in message:
        return "truncated"
    if "X-Robots-Tag" in message:
        return "disallowed_by_x_robots_tag"
    if "unknown url type" in message:
        return "bad_url"
    if "urlopen error" in message or "Connection" in message or "Remote end closed" in message:
        return "connection_error"
    if status == "failed_to_resize":
        return "not_an_image"
    return "other"


# ------------------------------------------------------------------------------ reading the rows
def read_official_rows(official_dir: str, splits: Sequence[str]) -> dict[str, list[files.Row]]:
    """The rows of each requested split; one sentence if the directory or a file is missing."""
    if not os.path.isdir(official_dir):
        raise ValueError(f"--official_dir {official_dir} is not a directory: point it at the "
                         "folder with the official product1m_<split>_ossurl_v2.txt files.")
    found = files.find_split_files(official_dir)
    missing = [s for s in splits if s not in found]
    if missing:
        names = ", ".join(files.split_filename(s) for s in missing)
        raise ValueError(f"{official_dir} has no {names}: point --official_dir at the official "
                         "text files, or leave those splits out of --splits.")
    rows = {}
    for split in splits:
        rows[split], stats = files.read_split_file(found[split], split)
        if sum(stats.skipped.values()):
            logging.info("%s: %d rows read, %d skipped as unusable (%s).", split, stats.rows_read,
                         sum(stats.skipped.values()), dict(stats.skipped))
    return rows


def copy_official_files(official_dir: str, out: str, splits: Sequence[str]) -> None:
    """Copies the text files next to the images, so `--manual_dir=OUT` has everything."""
    for split in splits:
        name = files.split_filename(split)
        source, target = os.path.join(official_dir, name), os.path.join(out, name)
        if os.path.abspath(source) == os.path.abspath(target):
            continue
        if (os.path.exists(target) and os.path.getsize(target) == os.path.getsize(source)
                and os.path.getmtime(target) >= os.path.getmtime(source)):
            continue
        shutil.copyfile(source, target + ".partial")
        os.replace(target + ".partial", target)


# ------------------------------------------------------------------------------ one pass
@dataclasses.dataclass
class PassResult:
    name: str
    requested: int = 0
    saved: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # id: (reason, msg)
    seconds: float = 0.0


def run_pass(name: str, jobs: list[tuple[str, str]], out: str, options: Options) -> PassResult:
    """Downloads `jobs` ([(id, url)]) with img2dataset into a fresh staging folder, then moves the
    good images into place (`harvest`). Raises if img2dataset itself fails."""
    start = time.perf_counter()
    staging = os.path.join(out, STAGING_DIR, f"{time.strftime('%Y%m%dT%H%M%S')}-{name}")
    os.makedirs(staging)
    table = pa.table({"id": [j[0] for j in jobs], "url": [j[1] for j in jobs]})
    pq.write_table(table, os.path.join(staging, "input.parquet"))
    kwargs = dict(
        url_list=os.path.join(staging, "input.parquet"), input_format="parquet", url_col="url",
        save_additional_columns=["id"], output_folder=os.path.join(staging, "shards"),
        output_format="files", processes_count=options.processes,
        thread_count=options.threads, timeout=options.timeout, retries=0,
        # A fresh folder each pass ("overwrite" would delete the _tmp folder it has just made).
        # Bytes as served: img2dataset's re-encoding drops EXIF orientation; the builder (or
        # `harvest` with --max_side) cleans images instead.
        disable_all_reencoding=True, encode_format="jpg", number_sample_per_shard=options.shard_size,
        incremental_mode="incremental", distributor=options.distributor, enable_wandb=False,
        user_agent_token=USER_AGENT_TOKEN, compute_hash=None,
        disallowed_header_directives=list(options.disallowed_header_directives))
    with open(os.path.join(staging, "img2dataset_args.json"), "w") as f:
        json.dump(kwargs, f, indent=1)
    log_path = os.path.join(staging, "img2dataset.log")
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    with open(log_path, "w") as log:
        run = subprocess.run([sys.executable, PASS_SCRIPT, os.path.join(staging,
                                                                         "img2dataset_args.json")],
                             stdout=log, stderr=subprocess.STDOUT, env=env)
    result = harvest(staging, out, options)
    result.name, result.requested = name, len(jobs)
    if run.returncode != 0:
        raise RuntimeError(f"img2dataset stopped with exit status {run.returncode} in pass {name}; "
                           f"its log is {log_path}. What it saved is in place; fix the cause and "
                           "rerun the same command to go on.")
    attempted = {j[0] for j in jobs}
    for item_id in attempted - set(result.saved) - set(result.failed):
        result.failed[item_id] = ("interrupted", "no result from img2dataset")
    shutil.rmtree(staging)
    result.seconds = time.perf_counter() - start
    return result


def harvest(staging: str, out: str, options: Options) -> PassResult:
    """Moves every image img2dataset saved in `staging` that opens into `images/` (atomically),
    and reads the failures from its finished shards. Safe on the leftovers of a killed run."""
    result = PassResult(name=os.path.basename(staging))
    sidecars = sorted(glob.glob(os.path.join(staging, "shards", "[0-9]*", "*.json")))
    ids_seen = set()

    def take(sidecar: str) -> tuple[str, str | None, str]:
        with open(sidecar) as f:
            meta = json.load(f)
        item_id = str(meta.get("id"))
        if meta.get("status") != "success":
            return item_id, classify(meta.get("status", ""), meta.get("error_message")), ""
        source = sidecar[: -len(".json")] + ".jpg"
        try:
            with open(source, "rb") as f:
                data = f.read()
            data = checked_image(data, options)
        except (OSError, ValueError) as e:
            reason = "too_small" if "smaller than" in str(e) else "not_an_image"
            return item_id, reason, str(e)[:200]
        target = image_path(out, item_id)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        partial = f"{target}.partial-{os.getpid()}"
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, target)  # Atomic: a kill leaves the old state or the whole image.
        return item_id, None, ""

    workers = max(2, 2 * options.processes)  # PIL decodes without holding the GIL.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for item_id, reason, message in pool.map(take, sidecars):
            ids_seen.add(item_id)
            if reason is None:
                result.saved.append(item_id)
            else:
                result.failed[item_id] = (reason, message)
    for table in _finished_shard_tables(staging):
        for item_id, status, message in zip(table["id"], table["status"], table["error_message"]):
            item_id = str(item_id)
            if status != "success" and item_id not in ids_seen:
                result.failed[item_id] = (classify(status, message), message or "")
    return result


def _finished_shard_tables(staging: str) -> Iterable[dict]:
    """The result tables of the shards img2dataset finished (a `_stats.json` is written last)."""
    for stats in sorted(glob.glob(os.path.join(staging, "shards", "*_stats.json"))):
        path = stats[: -len("_stats.json")] + ".parquet"
        try:
            yield pq.read_table(path, columns=["id", "status", "error_message"]).to_pydict()
        except (OSError, pa.ArrowInvalid) as e:
            logging.warning("Cannot read %s (%s): its failures count as interrupted.", path, e)


def checked_image(data: bytes, options: Options) -> bytes:
    """`data` if it is an image whose shorter side is at least `min_side` (cleaned by the builder's
    rules when `max_side` > 0); raises ValueError otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
    except Exception as e:  # PIL raises several types for bytes that are no image.
        raise ValueError(f"not an image ({type(e).__name__})") from e
    if min(size) < options.min_side:
        raise ValueError(f"{size[0]}x{size[1]} is smaller than --min_side={options.min_side}")
    if options.max_side > 0:
        try:
            return files.clean_image(data, options.max_side).jpeg
        except files.BadImageError as e:
            raise ValueError(str(e)) from e
    return data


def collect_leftovers(out: str, options: Options) -> int:
    """Moves into place what a killed run had saved in `.staging`, then removes it. Returns how
    many images were saved that way."""
    for partial in glob.glob(os.path.join(out, "images", "*", "*.jpg.partial-*")):
        os.remove(partial)  # An image being moved into place when a run was killed.
    saved = 0
    for staging in sorted(glob.glob(os.path.join(out, STAGING_DIR, "*"))):
        saved += len(harvest(staging, out, options).saved)
        shutil.rmtree(staging)
    if saved:
        logging.info("Collected %d images saved by an earlier, interrupted run.", saved)
    return saved


# ------------------------------------------------------------------------------ the whole download
def download(official_dir: str, out: str, splits: Sequence[str], options: Options) -> dict:
    """Downloads every missing image of `splits`; writes and returns the report."""
    start = time.perf_counter()
    rows = read_official_rows(official_dir, splits)
    os.makedirs(out, exist_ok=True)
    copy_official_files(official_dir, out, splits)
    recovered = collect_leftovers(out, options)
    urls: dict[str, tuple[str, ...]] = {}
    for split in splits:  # An id in several splits is one image, downloaded once.
        for row in rows[split]:
            urls.setdefault(row.id, row.urls)
    had, _ = files.index_images(os.path.join(out, "images"))
    missing = [i for i in urls if i not in had]
    logging.info("%d distinct ids in %s: %d saved already, %d to download.", len(urls),
                 ", ".join(splits), len(urls) - len(missing), len(missing))
    attempts: dict[str, list[tuple[int, str, str]]] = collections.defaultdict(list)
    saved_via: dict[str, int] = {}
    passes = []
    first, other = options.first_url - 1, 2 - options.first_url

    def do_pass(name: str, jobs: dict[str, int]) -> None:
        if not jobs:
            return
        result = run_pass(name, [(i, urls[i][k]) for i, k in jobs.items()], out, options)
        for item_id in result.saved:
            saved_via[item_id] = jobs[item_id] + 1
        for item_id, (reason, message) in result.failed.items():
            attempts[item_id].append((jobs[item_id] + 1, reason, message))
        passes.append({"name": name, "requested": result.requested, "saved": len(result.saved),
                       "failed": dict(collections.Counter(r for r, _ in result.failed.values())),
                       "seconds": round(result.seconds, 1)})
        logging.info("Pass %s: %d requested, %d saved, %d failed (%s) in %.0f s.", name,
                     result.requested, len(result.saved), len(result.failed),
                     dict(collections.Counter(r for r, _ in result.failed.values())),
                     result.seconds)

    def usable(item_id: str, k: int) -> bool:
        return len(urls[item_id]) > k and bool(urls[item_id][k])

    do_pass(f"url{first + 1}", {i: first for i in missing if usable(i, first)})
    do_pass(f"url{other + 1}", {i: other for i in missing
                                if i not in saved_via and usable(i, other)})
    for round_ in range(1, options.retries + 1):
        jobs = {}
        for item_id in missing:
            if item_id in saved_via:
                continue
            last = {url: reason for url, reason, _ in attempts[item_id]}  # Latest per URL.
            retry = [url for url in (first + 1, other + 1) if RETRYABLE.match(last.get(url, ""))]
            if retry:
                jobs[item_id] = retry[0] - 1
        if not jobs:
            break
        wait = options.backoff * 2 ** (round_ - 1)
        logging.info("Retry round %d in %.0f s: %d ids whose last failure may pass.", round_,
                     wait, len(jobs))
        time.sleep(wait)
        do_pass(f"retry{round_}", jobs)
    report = make_report(rows, had, saved_via, attempts, passes, recovered, options,
                         time.perf_counter() - start)
    on_disk, _ = files.index_images(os.path.join(out, "images"))
    size = sum(os.path.getsize(p) for p in on_disk.values())
    report["images_on_disk"] = {"count": len(on_disk), "bytes": size,
                                "mean_kb": round(size / max(len(on_disk), 1) / 1024, 1)}
    write_report(out, report, rows, saved_via, attempts)
    return report


def make_report(rows, had, saved_via, attempts, passes, recovered, options, seconds) -> dict:
    splits = {}
    for split, split_rows in rows.items():
        counts = collections.Counter()
        failed, by_url = collections.Counter(), collections.Counter()
        for row in split_rows:
            if row.id in had:
                counts["saved_before"] += 1
            elif row.id in saved_via:
                counts[f"saved_url{saved_via[row.id]}"] += 1
            else:
                counts["failed"] += 1
                tries = attempts.get(row.id, [])
                failed[tries[-1][1] if tries else "no_url"] += 1
                by_url[final_reason(tries)] += 1
        total_saved = counts["saved_before"] + counts["saved_url1"] + counts["saved_url2"]
        splits[split] = {"rows": len(split_rows), "saved": total_saved,
                         "saved_before": counts["saved_before"],
                         "saved_url1": counts["saved_url1"], "saved_url2": counts["saved_url2"],
                         "failed": counts["failed"],
                         # By the reason of the last request, and by each URL's last reason.
                         "failed_by_reason": dict(sorted(failed.items())),
                         "failed_by_url_reasons": dict(sorted(by_url.items()))}
    totals = {k: sum(s[k] for s in splits.values())
              for k in ("rows", "saved", "saved_before", "saved_url1", "saved_url2", "failed")}
    for key in ("failed_by_reason", "failed_by_url_reasons"):
        totals[key] = dict(sorted(sum((collections.Counter(s[key]) for s in splits.values()),
                                      collections.Counter()).items()))
    return {"splits": splits, "total": totals, "passes": passes,
            "collected_from_interrupted_run": recovered, "seconds": round(seconds, 1),
            "options": dataclasses.asdict(options)}


def final_reason(tries: list[tuple[int, str, str]]) -> str:
    """A failed id's reason: its URLs' last reasons, e.g. `url1 http_403, url2 timeout`."""
    last = {url: reason for url, reason, _ in tries}
    return ", ".join(f"url{u} {last[u]}" for u in sorted(last)) or "no url"


def write_report(out, report, rows, saved_via, attempts) -> None:
    _write_atomic(os.path.join(out, REPORT_FILE), json.dumps(report, indent=1, sort_keys=False))
    lines = ["split\tid\treason\tmessages"]
    for split, split_rows in rows.items():
        for row in split_rows:
            tries = attempts.get(row.id)
            if tries and row.id not in saved_via:
                messages = " | ".join(f"url{u}: {m}" for u, _, m in tries if m)
                lines.append(f"{split}\t{row.id}\t{final_reason(tries)}\t"
                             f"{' '.join(messages.split())[:300]}")
    _write_atomic(os.path.join(out, FAILED_FILE), "\n".join(lines) + "\n")


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".partial", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".partial", path)


def summary_text(report: dict, out: str) -> str:
    """The one-screen summary printed at the end."""
    lines = [f"{'split':<8} {'rows':>9} {'saved':>9} {'before':>9} {'url1':>9} {'url2':>9} "
             f"{'failed':>8}  failed by the last request's reason"]
    for name, s in [*report["splits"].items(), ("total", report["total"])]:
        top = ", ".join(f"{r} {n}" for r, n in
                        collections.Counter(s["failed_by_reason"]).most_common(4))
        lines.append(f"{name:<8} {s['rows']:>9,} {s['saved']:>9,} {s['saved_before']:>9,} "
                     f"{s['saved_url1']:>9,} {s['saved_url2']:>9,} {s['failed']:>8,}  {top}")
    disk = report["images_on_disk"]
    lines += [f"images/ holds {disk['count']:,} images, {disk['bytes'] / 2**30:.2f} GiB "
              f"(mean {disk['mean_kb']} KB)",
              f"{report['seconds']:.0f} s; report {os.path.join(out, REPORT_FILE)}, failed ids "
              f"{os.path.join(out, FAILED_FILE)}",
              f"next: tfds build tfds_product1m --config=full --manual_dir={out}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the command
FLAGS = flags.FlagValues()
flags.DEFINE_string("official_dir", None, "Folder with the official product1m_<split>_ossurl_v2.txt "
                    "files.", required=True, flag_values=FLAGS)
flags.DEFINE_string("out", None, "Where the images, a copy of the text files and the report go; "
                    "the --manual_dir of `tfds build tfds_product1m --config=full`.",
                    required=True, flag_values=FLAGS)
flags.DEFINE_list("splits", list(files.SPLITS), "Splits to download.", flag_values=FLAGS)
flags.DEFINE_integer("processes", os.cpu_count() or 1, "img2dataset processes.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("threads", Options.threads, "Threads per process; at most processes x "
                     "threads requests are in flight to one host.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_float("timeout", Options.timeout, "Seconds a connection may stay silent.",
                   lower_bound=0.1, flag_values=FLAGS)
flags.DEFINE_integer("retries", Options.retries, "Retry rounds for HTTP 429/5xx, timeouts and "
                     "dropped connections, after both URLs were tried.", lower_bound=0,
                     flag_values=FLAGS)
flags.DEFINE_float("backoff", Options.backoff, "Seconds before the first retry round; doubles "
                   "each round.", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("max_side", Options.max_side, "0: keep images as served; N: store upright "
                     "RGB JPEGs at most N pixels on the longer side (the builder's cleaning).",
                     lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("min_side", Options.min_side, "Images whose shorter side is smaller fail as "
                     "too_small.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("first_url", "1", ["1", "2"], "The URL of pass 1; the other is pass 2's.",
                  flag_values=FLAGS)
flags.DEFINE_enum("distributor", Options.distributor, ["multiprocessing", "pyspark", "ray"],
                  "img2dataset's distributor: pyspark or ray for many machines (install them "
                  "yourself; see docs/dataset.md).", flag_values=FLAGS)
flags.DEFINE_list("disallowed_header_directives", list(Options.disallowed_header_directives),
                  "X-Robots-Tag directives that refuse an image (empty: none).", flag_values=FLAGS)


def main(argv: Sequence[str]) -> dict:
    cli.no_arguments(argv)
    unknown = [s for s in FLAGS.splits if s not in files.SPLITS]
    if unknown:
        cli.usage_error(f"--splits has {', '.join(unknown)}; choose from {', '.join(files.SPLITS)}",
                        cli.USAGE_STATUS)
    if FLAGS.distributor != "multiprocessing":  # Without Ray, img2dataset silently does nothing.
        module = {"ray": "ray", "pyspark": "pyspark"}[FLAGS.distributor]
        if importlib.util.find_spec(module) is None:
            cli.usage_error(f"--distributor={FLAGS.distributor} needs {module}: pip install "
                            f"{module} (see docs/dataset.md)", cli.USAGE_STATUS)
    options = Options(
        processes=FLAGS.processes, threads=FLAGS.threads, timeout=FLAGS.timeout,
        retries=FLAGS.retries, backoff=FLAGS.backoff, max_side=FLAGS.max_side,
        min_side=FLAGS.min_side, first_url=int(FLAGS.first_url), distributor=FLAGS.distributor,
        disallowed_header_directives=tuple(FLAGS.disallowed_header_directives))
    try:
        report = download(FLAGS.official_dir, FLAGS.out, FLAGS.splits, options)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("Interrupted: what was saved stays; rerun the same command to go on "
                         "from there.") from None
    print(summary_text(report, FLAGS.out))
    return report


if __name__ == "__main__":
    cli.run(main, FLAGS)
