"""The package list of pyproject.toml names every subpackage of compressor (it is listed by hand, because
model_cards/ ships under another name; a subpackage left out would be missing from a wheel)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "compressor").rglob("__init__.py")
             if "__pycache__" not in init.parts}
    assert found - listed == set(), "add these subpackages to [tool.setuptools] packages in pyproject.toml"
    assert "compressor.model_cards" in listed
