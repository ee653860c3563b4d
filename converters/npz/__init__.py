"""The ``npz`` kind: a folder of per-sample NPZ files, fields inferred from the first."""
