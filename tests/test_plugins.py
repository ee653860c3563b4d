"""The plug-in registry: names resolve through installed distributions' entry points, and two
distributions registering one name is an error naming both."""

from __future__ import annotations

from pathlib import Path

import pytest

from arraystore.errors import DuplicatePluginError, UnknownPluginError
from arraystore.plugins import SOURCES_GROUP, VIEWS_GROUP, load_plugin, plugin_names
from arraystore.views import GenericView, view_for


def install_distribution(site: Path, name: str, entries: dict[str, str]) -> None:
    """A distribution's metadata as pip leaves it in site-packages (no code needed: entry points
    are read without importing anything)."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n{line}\n" for group, line in entries.items()))


def test_the_packages_own_plugins_resolve() -> None:
    assert {"sa1b", "bin", "npz", "gopro", "coco-embeddings", "vis-cache"} <= set(
        plugin_names(SOURCES_GROUP))
    assert load_plugin(SOURCES_GROUP, "sa1b").__name__ == "Sa1bTarSource"
    assert type(view_for("sa1b")).__name__ == "Sa1bView"
    assert isinstance(view_for("a kind nobody registered"), GenericView)
    with pytest.raises(UnknownPluginError, match=r"no source named 'nope'; installed: .*sa1b"):
        load_plugin(SOURCES_GROUP, "nope")


def test_two_distributions_registering_one_name_is_an_error_naming_both(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_distribution(tmp_path, "first-plugins", {SOURCES_GROUP: "shards = first.src:Shards",
                                                     VIEWS_GROUP: "sa1b = first.view:View"})
    install_distribution(tmp_path, "second-plugins", {SOURCES_GROUP: "shards = second:Shards"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert plugin_names(SOURCES_GROUP).count("shards") == 1
    with pytest.raises(DuplicatePluginError,
                       match=r"first-plugins \(first.src:Shards\) and second-plugins "
                             r"\(second:Shards\) both register 'shards' under "
                             r"'arraystore.sources'; uninstall one"):
        load_plugin(SOURCES_GROUP, "shards")
    with pytest.raises(DuplicatePluginError, match=r"arraystore \(.*Sa1bView\) and "
                                                   r"first-plugins \(first.view:View\)"):
        view_for("sa1b")
