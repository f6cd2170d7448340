"""Model code: building blocks (`layers`), the CAPTURE model (`capture`), variants (`variants`)."""

from capture_jax.models.capture import CaptureModel
from capture_jax.models.variants import model_config

__all__ = ["CaptureModel", "model_config"]
