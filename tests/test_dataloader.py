"""ZarrDistillDataset in a DataLoader with 2 workers, under fork and spawn, for every backend.

TensorStore aborts any ``fork()`` in a process that has used it, and this pytest process reads
through TensorStore elsewhere; so the fork case runs in a fresh interpreter, as a training
script's parent would be -- one that has built the dataset and taken ``len()`` but not read.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from torch.utils.data import ConcatDataset, DataLoader

from arraystore import Layout, ingest
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.loaders import ZarrDistillDataset, collate_distill, dataloader_kwargs
from arraystore.loaders.dataloader import resolve_workers

LOADER_SCRIPT = textwrap.dedent("""
    import sys
    from torch.utils.data import DataLoader
    from arraystore.loaders import ZarrDistillDataset, collate_distill

    path, context, *backends = sys.argv[1:]
    for backend in backends:
        dataset = ZarrDistillDataset(path, backend=backend)
        assert len(dataset) == 5
        loader = DataLoader(dataset, batch_size=2, num_workers=2,
                            multiprocessing_context=context, collate_fn=collate_distill)
        seen = []
        for batch in loader:
            assert tuple(batch["image"].shape[1:]) == (3, 1024, 1024)
            assert tuple(batch["teacher_features"].shape[1:]) == (256, 64, 64)
            seen.extend(batch["image_id"])
        print(backend, ",".join(seen))
""")
BACKENDS = ("auto", "tensorstore", "zarr")


@pytest.fixture(scope="module", params=["raw", "sharded+zstd"])
def store(request, tmp_path_factory, shard):
    layout = Layout("sharded", shard_size=2, compression="zstd") if request.param != "raw" \
        else Layout("raw")
    out = tmp_path_factory.mktemp("dl") / "sa1b.zarr"
    ingest(Sa1bTarSource(), [shard], out, layout=layout, workers=1)
    return out


def test_dataloader_fork_workers(store) -> None:
    """Every backend in turn, in one fresh interpreter (each a DataLoader of its own)."""
    result = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, str(store), "fork",
                             *BACKENDS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [f"{b} big,small,tall,empty,ties" for b in BACKENDS]


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_dataloader_spawn_and_forkserver_workers(store, context: str) -> None:
    """One DataLoader over the store read through every backend (a ``ConcatDataset``: the
    workers start once, each backend's dataset is pickled to them)."""
    datasets = [ZarrDistillDataset(store, backend=backend) for backend in BACKENDS]
    loader = DataLoader(ConcatDataset(datasets), batch_size=2, num_workers=2,
                        multiprocessing_context=context, collate_fn=collate_distill)
    batches = list(loader)
    images = np.concatenate([b["image"].numpy() for b in batches])
    ids = [i for b in batches for i in b["image_id"]]
    for n, (backend, dataset) in enumerate(zip(BACKENDS, datasets, strict=True)):
        expected = [dataset[i] for i in range(len(dataset))]  # reading in the parent is fine
        rows = slice(n * len(dataset), (n + 1) * len(dataset))
        np.testing.assert_array_equal(images[rows], np.stack([e["image"].numpy()
                                                              for e in expected]), backend)
        assert ids[rows] == [e["image_id"] for e in expected], backend


def test_dataset_pickles_without_handles(store) -> None:
    dataset = ZarrDistillDataset(store)
    first = dataset[0]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.reader._open.peek() is None  # nothing opened before its first read
    np.testing.assert_array_equal(clone[0]["image"], first["image"])
    assert len(pickle.dumps(dataset)) < 10_000


def test_keys_subset_reads_only_the_fields_it_needs(store) -> None:
    dataset = ZarrDistillDataset(store, keys=("image", "num_bboxes", "image_id"))
    item = dataset[1]
    assert list(item) == ["image", "num_bboxes", "image_id"]
    assert item["image_id"] == "small" and item["num_bboxes"] == 1
    opened = dataset.reader._open.get().readers
    assert set(opened) == {"image", "metadata"}  # nothing else is opened
    assert dataset.reader.fields == ("image", "metadata")
    with pytest.raises(KeyError, match="unknown item keys"):
        ZarrDistillDataset(store, keys=("teacher_feature",))


def test_worker_counts_follow_the_seed_settings() -> None:
    assert resolve_workers("auto", cpus=10) == 8
    assert resolve_workers("cpu*0.9", cpus=10) == 9
    assert resolve_workers("cpu * 0.5", cpus=3) == 1
    assert resolve_workers(6, cpus=2) == 6
    for bad in ("many", "cpu*", -1):
        with pytest.raises(ValueError):
            resolve_workers(bad, cpus=4)
    kwargs = dataloader_kwargs(total_workers=8, gpus=2, prefetch_factor=2, pin_memory=False)
    assert kwargs["num_workers"] == 4 and kwargs["prefetch_factor"] == 2
    assert kwargs["persistent_workers"] is True and kwargs["pin_memory"] is False
    assert dataloader_kwargs(total_workers=0) == {"num_workers": 0, "pin_memory": False}


def test_forkserver_once_tensorstore_is_loaded(monkeypatch, store) -> None:
    monkeypatch.delitem(sys.modules, "tensorstore", raising=False)
    assert "multiprocessing_context" not in dataloader_kwargs(total_workers=2)
    import tensorstore

    monkeypatch.setitem(sys.modules, "tensorstore", tensorstore)
    kwargs = dataloader_kwargs(total_workers=2)
    assert kwargs["multiprocessing_context"] == "forkserver"
    batches = list(DataLoader(ZarrDistillDataset(store, "tensorstore"), batch_size=5,
                              collate_fn=collate_distill, **kwargs))
    assert batches[0]["image"].shape[0] == 5
