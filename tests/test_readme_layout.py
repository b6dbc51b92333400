"""README's layout section names every package and module of the source tree, so the map a
newcomer reads first cannot fall behind the house."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _layout() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def _named(layout: str, name: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", layout) is not None


def test_every_package_and_module_is_in_the_layout() -> None:
    layout = _layout()
    missing = []
    for package in ("registry", "composer"):
        for path in sorted((ROOT / package).iterdir()):
            if path.name.startswith(("_", ".")):
                continue
            if path.suffix == ".py" and not _named(layout, path.name):
                missing.append(f"{package}/{path.name}")
            package_dir = path.is_dir() and (path / "__init__.py").is_file()
            if package_dir and not _named(layout, f"{path.name}/"):
                missing.append(f"{package}/{path.name}/")
    for package in ("registry/storage", "registry/builds", "registry/cli"):
        for path in sorted((ROOT / package).glob("*.py")):
            if not path.name.startswith("_") and not _named(layout, path.name):
                missing.append(f"{package}/{path.name}")
    assert not missing, f"README's layout does not name: {missing}"


def test_the_check_sees_a_missing_name() -> None:
    assert not _named("  store.py, composition_store.py", "s3_blobs.py")
    assert _named("  store.py, composition_store.py", "store.py")
    assert not _named("  composition_store.py", "store.py")
