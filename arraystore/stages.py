"""Model stages of an ingest: a model run in the writer process on batches of derived samples.

Workers decode and prepare each sample's model input (an image, a preprocessed crop); the stage
stacks the inputs of ``batch_size`` samples, runs the model once, and writes its outputs into
the samples' fields before they are stored. The SAM2 teacher (P4/P5 from the image) and the
SigLIP embedder (an embedding from a crop that is not itself stored) are both this one stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np


class Model(Protocol):
    """What a stage runs: (B, ...) inputs -> one (B, ...) output array, or a tuple of them."""

    batch_size: int

    def __call__(self, inputs: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]: ...

    def describe(self) -> dict[str, Any]:
        """What to record in the store's provenance (model, weights checksum, ...)."""
        ...


class ModelStage:
    """A :class:`~arraystore.sources.BatchStage`: ``model`` on each sample's ``input_key``,
    its outputs stored as ``outputs`` (in order), ``flags`` set, and the input dropped when
    ``consume_input`` (a temporary value, not a field). ``name`` keys the provenance entry."""

    def __init__(self, model: Model, input_key: str, outputs: Sequence[str], *,
                 consume_input: bool = False, flags: Mapping[str, Any] | None = None,
                 name: str = "model") -> None:
        self.model, self.input_key, self.outputs = model, input_key, tuple(outputs)
        self.consume_input, self.flags, self.name = consume_input, dict(flags or {}), name
        self.batch_size = model.batch_size

    def __call__(self, samples: list[dict[str, Any]]) -> None:
        results = self.model(np.stack([sample[self.input_key] for sample in samples]))
        results = results if isinstance(results, tuple) else (results,)
        for k, sample in enumerate(samples):
            for name, values in zip(self.outputs, results, strict=True):
                sample[name] = values[k]
            sample.update(self.flags)
            if self.consume_input:
                del sample[self.input_key]

    def describe(self) -> dict[str, Any]:
        return self.model.describe()
