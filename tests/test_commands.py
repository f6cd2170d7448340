"""Every command the README and docs/ show, run the way a user types it.

Each runs in a subprocess with a clean environment: no `PYTHONPATH`, only this virtualenv's `bin`
(its `python` and the stock `tfds` console script) ahead of the system's on `PATH`; from the
repository root and, where the command allows it, from another directory. pytest's own import
path (the repository root) is not inherited, so a command that only works inside the test suite
fails here. The project must be installed the README's way (`pip install -r requirements.txt -e .`).
"""

import ast
import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
TIMEOUT_S = 300  # Per command, on 2 busy CPU cores; never asserted.


def user_env() -> dict[str, str]:
    """What a fresh shell with the virtualenv activated has; the JAX compilation cache the rest of
    the suite shares is kept (it changes how long a compile takes, not what runs)."""
    env = {"HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
           "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "VIRTUAL_ENV": os.path.dirname(VENV_BIN)}
    for name in ("TMPDIR", "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def run(command: list[str], cwd, expect_ok: bool | None = True) -> subprocess.CompletedProcess:
    """Runs `command` as typed in a shell at `cwd`; fails the test with its output if the exit
    status is not what `expect_ok` says (None: any status)."""
    result = subprocess.run(command, cwd=cwd, env=user_env(), capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    if expect_ok is not None and (result.returncode == 0) != expect_ok:
        pytest.fail(f"`{' '.join(command)}` in {cwd} exited {result.returncode}:\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture
def elsewhere(tmp_path):
    """A working directory outside the repository."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


def test_the_project_is_installed(elsewhere):
    out = subprocess.run(["python", "-c", "import capture_jax, tfds_product1m; "
                          "print(capture_jax.__file__); print(tfds_product1m.__file__)"],
                         cwd=elsewhere, env=user_env(), capture_output=True, text=True)
    assert out.returncode == 0, (
        "capture_jax is not importable outside the repository: install the project as the README "
        f"says (pip install -r requirements.txt -e .).\n{out.stderr[-2000:]}")
    for line in out.stdout.split():
        assert line.startswith(REPO), f"{line} is not this checkout's (an older install?)"


def test_the_dataset_package_imports_nothing_from_capture_jax():
    """One-way layering: `capture_jax` stands on `tfds_product1m`, never the other way."""
    offenders = []
    for path in sorted(glob.glob(os.path.join(REPO, "tfds_product1m", "*.py"))):
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{os.path.basename(path)}:{node.lineno}" for n in names
                          if n.split(".")[0] == "capture_jax"]
    assert not offenders, f"tfds_product1m imports capture_jax at {offenders}"


def test_reading_the_official_files_imports_no_tensorflow(elsewhere):
    code = ("import sys\n"
            "from tfds_product1m import download, product1m_files, region_features, synthetic\n"
            f"rows, stats = product1m_files.read_split_file({REPO!r} + "
            "'/tfds_product1m/dummy_data/product1m_dev_ossurl_v2.txt', 'dev')\n"
            "assert rows, 'no rows read'\n"
            "loaded = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'tensorflow', 'tensorflow_datasets', 'jax', 'capture_jax'})\n"
            "assert not loaded, loaded\n")
    run(["python", "-c", code], elsewhere)


# --------------------------------------------------------------------- the dataset builder
@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
    """`tfds build tfds_product1m --config=synthetic_tiny --data_dir=D` from the repository root,
    as the README's data section shows it; D is reused by the main.py run below."""
    data_dir = tmp_path_factory.mktemp("tfds")
    run(["tfds", "build", "tfds_product1m", "--config=synthetic_tiny", f"--data_dir={data_dir}"],
        REPO)
    return data_dir


def _built_splits(data_dir, config: str) -> dict[str, int]:
    (info_path,) = glob.glob(str(data_dir / "tfds_product1m" / config / "*" / "dataset_info.json"))
    info = json.loads(open(info_path).read())
    return {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in info["splits"]}


def test_tfds_build_synthetic_tiny_from_the_repository_root(tiny_data_dir):
    assert _built_splits(tiny_data_dir, "synthetic_tiny") == {
        "train": 96, "gallery": 72, "dev": 16, "test": 16}


# `synthetic_regions` (the full-size regions config, about 75 s) runs the same code as
# `synthetic_regions_tiny` at another size; `synthetic` covers the full-size image path.
@pytest.mark.parametrize("config,train_rows", [("synthetic_regions_tiny", 96), ("synthetic", 2000)])
def test_tfds_build_by_path_from_another_directory(elsewhere, tmp_path, config, train_rows):
    run(["tfds", "build", os.path.join(REPO, "tfds_product1m"), f"--config={config}",
         f"--data_dir={tmp_path / 'data'}"], elsewhere)
    assert _built_splits(tmp_path / "data", config)["train"] == train_rows


def test_tfds_build_full_with_a_split_without_images_says_which_and_why(elsewhere, tmp_path):
    manual = tmp_path / "manual"
    run(["python", "-m", "tfds_product1m.synthetic", f"--out={manual}", "--products=4",
         "--train=8", "--gallery_per_product=2", "--dev=8", "--test=8", "--image_size=32"],
        elsewhere)
    for image in glob.glob(str(manual / "images" / "train" / "*" / "*.jpg")):
        os.remove(image)
    result = run(["tfds", "build", "tfds_product1m", "--config=full", f"--manual_dir={manual}",
                  f"--data_dir={tmp_path / 'data'}"], REPO, expect_ok=False)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: Product1M train: no usable row, so the split cannot be "
                           "built: all 12 rows were skipped (missing_image 10, duplicate_id 1, "
                           "short_row 1); missing_image: no <id>.jpg anywhere"), last
    assert "No examples were yielded" not in result.stderr


# --------------------------------------------------------------------- the other commands
HELP = {  # command -> flags its --helpshort must list
    ("python", "main.py"): ["--config", "--workdir", "--mode"],
    ("python", "-m", "capture_jax.metrics"): ["--gt_dir", "--retrieval_file", "--output_dir"],
    ("python", "-m", "capture_jax.convert"): ["--reference_checkpoint", "--config", "--output"],
    ("python", "-m", "tfds_product1m.download"): ["--official_dir", "--out", "--splits"],
    ("python", "-m", "tfds_product1m.synthetic"): ["--out", "--products", "--region_features"],
    ("python", "bench/model_flops.py"): ["--variants", "--batch_size"],
    ("python", "bench/build_dataset.py"): ["--repeats"],
    ("python", "bench/retrieval.py"): ["--sizes", "--methods"],
    ("python", "bench/train_throughput.py"): ["--variants", "--batch_sizes"],
    ("python", "bench/device_check.py"): ["--tiny"],
    ("python", "bench/optimizer_pass.py"): [],
    ("python", "bench/download_loopback.py"): ["--images", "--repeats"],
}


@pytest.mark.parametrize("command", list(HELP), ids=[" ".join(c[1:]) for c in HELP])
def test_helpshort_lists_the_flags(command):
    out = run([*command, "--helpshort"], REPO, expect_ok=None).stdout  # absl's help exits 1.
    for flag in HELP[command]:
        assert flag in out, f"{' '.join(command)} --helpshort does not list {flag}:\n{out}"


def test_synthetic_and_metrics_from_another_directory(elsewhere):
    run(["python", "-m", "tfds_product1m.synthetic", "--out=raw", "--products=4", "--train=8",
         "--gallery_per_product=2", "--dev=8", "--test=8", "--image_size=32"], elsewhere)
    gallery, queries = [], []
    for split, into in (("gallery", gallery), ("dev", queries), ("test", queries)):
        with open(elsewhere / "raw" / f"product1m_{split}_ossurl_v2.txt", encoding="utf-8") as f:
            into += [line.split("#####")[0].strip() for line in f if "#####" in line]
    (elsewhere / "ranked.txt").write_text(
        "".join(f"{q},{','.join(gallery)}\n" for q in queries), encoding="utf-8")
    run(["python", "-m", "capture_jax.metrics", "--gt_dir=raw", "--retrieval_file=ranked.txt",
         "--output_dir=scores"], elsewhere)
    scores = json.loads((elsewhere / "scores" / "metric_results.json").read_text())
    assert scores and all(0 <= v <= 100 for v in scores.values() if isinstance(v, float))


def test_convert_from_another_directory(elsewhere):
    """A reference (PyTorch-named) checkpoint of the `tiny` model, converted by the command."""
    code = ("import numpy as np\n"
            "from flax import nnx\n"
            "from safetensors.numpy import save_file\n"
            "from capture_jax import convert\n"
            "from capture_jax.models import capture\n"
            "import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('capture_configs', {REPO!r} + "
            "'/configs/capture.py')\n"
            "configs = importlib.util.module_from_spec(spec); spec.loader.exec_module(configs)\n"
            "config = configs.get_config('tiny').model\n"
            "with nnx.use_eager_sharding(False):\n"
            "    state = nnx.state(capture.CaptureModel(config, rngs=nnx.Rngs(0)))\n"
            "save_file({k: np.asarray(v) for k, v in convert.params_to_reference(state, config)"
            ".items()}, 'reference.safetensors')\n")
    run(["python", "-c", code], elsewhere)
    run(["python", "-m", "capture_jax.convert", "--reference_checkpoint=reference.safetensors",
         "--config=tiny", "--output=converted"], elsewhere)
    assert (elsewhere / "converted" / "checkpoints" / "0").is_dir()


def test_download_without_official_files_says_what_to_do(elsewhere):
    result = run(["python", "-m", "tfds_product1m.download", "--official_dir=nothing_here",
                  "--out=images"], elsewhere, expect_ok=False)
    assert result.stderr.strip().startswith("error: ") and "nothing_here" in result.stderr
    assert "Traceback" not in result.stderr


def test_main_trains_and_evaluates_from_another_directory(elsewhere, tiny_data_dir):
    """`python main.py --config configs/capture.py:VARIANT --workdir DIR` with absolute paths,
    on the dataset the stock `tfds build` made above (evaluation is tested in test_train.py)."""
    result = run(["python", os.path.join(REPO, "main.py"),
                  "--config", os.path.join(REPO, "configs", "capture.py") + ":tiny",
                  "--workdir=run", f"--config.dataset.data_dir={tiny_data_dir}",
                  "--config.num_train_steps=2", "--config.evals.retrieval.every=-1"], elsewhere)
    log = result.stderr + result.stdout
    assert "Run summary (tiny): finished." in log
    assert (elsewhere / "run" / "checkpoints" / "2").is_dir()
    assert (elsewhere / "run" / "config.json").is_file()
