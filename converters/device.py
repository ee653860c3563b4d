"""Which torch device a ``--device`` option names, checked where the option is parsed.

A model is built after the store is opened and the inputs listed; a misspelt device would only
fail then, as torch's own error. :func:`device_problem` says what is wrong first.
"""

from __future__ import annotations


def device_problem(value: str) -> str | None:
    """Why ``value`` cannot be the device of a model on this machine, or None."""
    if value == "cpu":  # the default: no need to import torch to parse a command line
        return None
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        return "is not a torch device; use cpu, cuda, cuda:<index> or mps"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "names a GPU, but torch sees none on this machine; use --device cpu"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"names a GPU this machine lacks (it has {torch.cuda.device_count()})"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "names Apple's GPU, which torch cannot use here; use --device cpu"
    return None
