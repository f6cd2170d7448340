"""configs/capture.py: plain data (no TensorFlow, JAX or Orbax on load), one table of variants."""

import json
import os
import subprocess
import sys

import pytest

from capture_jax.models import capture
from configs import capture as capture_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("tensorflow", "jax", "orbax", "flax", "numpy")


@pytest.mark.parametrize("variant", list(capture_configs.VARIANTS))
def test_loading_a_config_imports_no_framework(variant):
    """As main.py's --config flag loads it (by path), in a fresh interpreter."""
    code = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('cfg', 'configs/capture.py')\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"config = module.get_config({variant!r})\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True, timeout=120)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_every_variant_builds_with_every_field():
    def fields(d, prefix=""):
        return {f"{prefix}{k}" if not isinstance(v, dict) else f
                for k, v in d.items() for f in (fields(v, f"{prefix}{k}.")
                                                 if isinstance(v, dict) else [None])}

    configs = {name: capture_configs.get_config(name) for name in capture_configs.VARIANTS}
    assert set(configs) == {"paper", "paper_pixels", "demo", "demo_regions", "tiny"}
    assert len({frozenset(fields(c.to_dict())) for c in configs.values()}) == 1
    assert capture_configs.get_config().to_dict() == configs["paper"].to_dict()
    for name, config in configs.items():
        assert config.variant == name
        retrieval = config.evals.retrieval
        assert retrieval.headline in (*retrieval.feature_kinds, *retrieval.baselines)
        image_baseline = {"pixels": "color_histogram", "regions": "region_mean"}
        assert retrieval.baselines == ("tfidf", image_baseline[config.model.visual.kind]), name
    assert configs["paper"].model.visual.kind == "regions"
    assert configs["paper_pixels"].model.visual.kind == "pixels"
    assert configs["demo"].model.hidden_size <= 256
    assert configs["demo_regions"].model.to_dict() == dict(
        configs["demo"].model.to_dict(), visual=dict(configs["demo"].model.visual.to_dict(),
                                                     kind="regions"))
    with pytest.raises(ValueError, match="paper_pixels"):
        capture_configs.get_config("huge")


def test_configs_are_fresh_and_overridable():
    config = capture_configs.get_config("paper")
    config.model.vocab_size = 3000
    config.dataset.data_dir = "/data"
    assert capture_configs.get_config("paper").model.vocab_size == 21128
    assert capture_configs.get_config("paper").dataset.data_dir is None


def test_default_feature_kinds_are_the_models():
    for name in capture_configs.VARIANTS:
        kinds = capture_configs.get_config(name).evals.retrieval.feature_kinds
        assert kinds == tuple(capture.FEATURE_KINDS)
