"""Model code: building blocks (`layers`), the CAPTURE model (`capture`), FLOP counts (`cost`).
Model sizes are data: `config.model` of `configs/capture.py`."""

from capture_jax.models.capture import CaptureModel

__all__ = ["CaptureModel"]
