"""Workarounds for the environment, in one place; each says why it exists and when it can go.

Two: the first lets ``torchvision`` import beside a CPU-only torch (open_clip and timm import
it); the second (:func:`detach_event_loops`, at the end) keeps a forked child's clean-up away
from its parent's event loop.

PyPI's torchvision 0.28.0 is a CUDA build: its C++ library (``torchvision/_C``) does not load
with the CPU torch, and then ``import torchvision`` fails on registering fake kernels for
``torchvision::nms`` ("operator torchvision::nms does not exist"). When -- and only when -- that
library cannot be loaded, :func:`ensure_torchvision_ops` declares the two operator schemas
torchvision's Python side needs (``nms``, ``qnms``). Nothing here implements them: the crops and
transforms this project uses never call them, and a call would fail loudly.

A user's own script may import open_clip (or torchvision) before anything of arraystore:
``python -m arraystore.compat --install-hook`` (the README's set-up runs it) writes a
``.pth`` file into the environment's site-packages that, at interpreter start, loads this file
alone (not its package: no import cost) and adds :class:`DeclareOpsOnImport`, which runs
:func:`ensure_torchvision_ops` just before torchvision is first imported. It goes -- with this
module -- once PyPI's torchvision wheels for a torch release load beside its CPU build.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import selectors
import sys
import sysconfig
import types
from pathlib import Path
from typing import Any

OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor",
)
DECLARED = "arraystore_torchvision_schemas"  # in sys.modules once the schemas are declared


def native_ops_load() -> bool:
    """Whether torchvision's own C++ operators load in this torch (True if not installed)."""
    import torch

    # the path finder alone: the import hook below must not see this look-up as an import
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True
    folder = os.path.dirname(spec.origin)
    names = [n for n in os.listdir(folder) if n.startswith("_C.") or n == "_C.so"]
    if not names:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, names[0]))
    except OSError:
        return False
    return True


def ensure_torchvision_ops() -> bool:
    """Declare the missing operators if torchvision's library cannot load; True if it did."""
    if DECLARED in sys.modules or "torchvision" in sys.modules or native_ops_load():
        return False
    import torch

    # the schemas live as long as their Library object, kept in sys.modules: the one place
    # that this module and the copy of it the .pth hook loads (another module object) share
    declared = types.ModuleType(DECLARED, "torchvision operator schemas declared by arraystore")
    declared.library = torch.library.Library("torchvision", "DEF")  # schemas only, no kernels
    for schema in OPS:
        declared.library.define(schema)
    sys.modules[DECLARED] = declared
    return True


class DeclareOpsOnImport(importlib.abc.MetaPathFinder):
    """A finder that finds nothing: asked for ``torchvision`` the first time, it leaves the
    import path and declares the operators if they are missing, then lets the usual finders
    import torchvision."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            ensure_torchvision_ops()


def watch_for_torchvision() -> None:
    """Declare the operators, if needed, when torchvision is first imported (the hook's
    ``.pth`` line calls this at interpreter start)."""
    if "torchvision" not in sys.modules and not any(
            type(f).__name__ == DeclareOpsOnImport.__name__ for f in sys.meta_path):
        # by name: the interpreter may read the .pth twice, each time loading a fresh copy of
        # this file whose class is another object (and whose declared schemas clash)
        sys.meta_path.insert(0, DeclareOpsOnImport())


HOOK_FILE = "arraystore-torchvision-ops.pth"


def hook_line(module_file: str) -> str:
    """The ``.pth`` line that loads ``module_file`` (this file) alone and starts watching; it
    does nothing once that file is gone (a moved checkout must not break every interpreter)."""
    return ("import os, importlib.util as u; s = u.spec_from_file_location("
            f"'arraystore_compat', {module_file!r}) if os.path.isfile({module_file!r}) else None; "
            "m = s and u.module_from_spec(s); "
            "s and (s.loader.exec_module(m), m.watch_for_torchvision())\n")


def install_hook(site_packages: str | None = None) -> Path:
    """Write the hook's ``.pth`` into ``site_packages`` (default: this environment's) and
    return its path. It points at this very file, so install the package first."""
    folder = Path(site_packages or sysconfig.get_paths()["purelib"])
    path = folder / HOOK_FILE
    path.write_text(hook_line(os.path.abspath(__file__)))
    return path


def inherited_event_loops() -> list[Any]:
    """(In a process about to fork) the event loops whose sockets a child will inherit, where
    their libraries are imported: fsspec's I/O loop, which fsspec's object-store clients
    (s3fs, gcsfs, adlfs) run on, and zarr-python's, which its ``FsspecStore`` runs them on.
    Both libraries keep their loop as ``module.loop[0]``."""
    loops = []
    for name in ("fsspec.asyn", "zarr.core.sync"):
        held = getattr(sys.modules.get(name), "loop", None)
        if isinstance(held, list) and held and held[0] is not None:
            loops.append(held[0])
    return loops


def detach_event_loops(loops: list[Any]) -> None:
    """(In a forked child) give each of the parent's event ``loops`` (its copy of them) a
    selector of its own, have it say it is not running, and drop what is reported on it.

    Why: a loop's selector is an epoll instance, and a forked child shares it with its parent
    (the descriptor is copied; the instance is one). The parent's loop is dead in the child,
    but its clients are not: when one is collected there (fsspec forgets its clients in a
    child, and their finalizers close their connections), closing a connection unregisters its
    socket from that shared instance, and the parent never hears that socket's answers again.
    Measured: a DataLoader's forked workers over an S3 store made the parent's next request
    wait 15 s (s3fs's read timeout) before a retry on a new connection. With a selector of
    its own, the child unregisters nothing of the parent's.

    Not running: the copy still says it runs (its thread's id is the parent's), so an
    inherited s3fs client's finalizer hands its clean-up to that loop and waits 0.1 s for a
    thread the child does not have (each client collected there), then leaves its session
    unclosed. Told the truth, the finalizer skips the wait. What is then collected on the
    copy is the parent's (sessions, connectors it never closed in the child, rightly:
    closing would write to the parent's connections), and aiohttp reports each on the loop:
    "Unclosed client session", "Unclosed connector", printed on a DataLoader worker's stderr
    when it first collects garbage. The copy runs nothing of the child's, so its reports
    are dropped. When it can go: when fsspec gives a child's inherited loop (or its
    clients) a clean-up that leaves the parent's sockets alone and says nothing."""
    for loop in loops:
        selector = getattr(loop, "_selector", None)
        if selector is not None:
            loop._selector = selectors.DefaultSelector()
        if hasattr(loop, "_thread_id"):
            loop._thread_id = None  # asyncio's BaseEventLoop.is_running() reads it
        loop.set_exception_handler(_ignore_report)


def _ignore_report(loop: Any, context: dict[str, Any]) -> None:
    """The exception handler of a loop a forked child inherited: reports nothing."""


if __name__ == "__main__":
    if sys.argv[1:] != ["--install-hook"]:
        sys.exit("usage: python -m arraystore.compat --install-hook")
    print(f"wrote {install_hook()}")
