"""The family registry and the mixer contract: every family found in its folder, every mixer meeting ``Mixer``,
every shipped file derived from the modeling file's imports."""

from __future__ import annotations

import ast
import pkgutil

import pytest
import tiny_fla
import tiny_hybrids
import tiny_models

import compressor.families as families
from compressor.export import shipped_files
from compressor.families import FAMILIES, family_for
from compressor.families.base import Family, Mixer
from compressor.layers import linear_layers
from compressor.state_capture import WITH_STATES

MODELS = [(tiny_models.tiny_model, name) for name in tiny_models.CONFIGS]
MODELS += [(tiny_hybrids.tiny_hybrid, name) for name in tiny_hybrids.CONFIGS]
MODELS += [(tiny_fla.tiny_fla_model, name) for name in tiny_fla.CONFIGS]


def test_every_family_module_is_found():
    modules = {info.name for info in pkgutil.iter_modules(families.__path__)} - set(families.NOT_FAMILIES)
    defined = {module for module in modules
               if any(isinstance(v, Family) for v in vars(__import__(f"compressor.families.{module}",
                                                                      fromlist=["_"])).values())}
    assert defined == modules
    assert len(FAMILIES) == len({id(family) for family in FAMILIES}) == len(modules)


@pytest.mark.parametrize("build, name", MODELS, ids=[name for _, name in MODELS])
def test_every_mixer_meets_the_contract(build, name):
    model = build(name)
    family = family_for(model.config)
    mixers = linear_layers(model, family)
    assert mixers
    for index, mixer in mixers.items():
        assert isinstance(mixer, Mixer) and isinstance(mixer, family.mixer_class)
        assert mixer.layer_idx == index and len(mixer.value_to_key) == mixer.num_v_heads
        assert type(mixer).recurrence in WITH_STATES  # calibration can read its states


@pytest.mark.parametrize("family", FAMILIES, ids=[family.name for family in FAMILIES])
def test_shipped_files_are_the_modeling_file_and_what_it_imports(family):
    names = [path.name for path in shipped_files(family)]
    assert names[0] == family.modeling_file and len(names) == len(set(names))
    assert "gated_deltanet.py" in names and "gated_delta.py" in names
    for path in shipped_files(family):
        text = path.read_text()
        assert "state_capture" not in text and "state_sink" not in text, path.name
        # fla's internals are looked up at the first call, where a function of another shape is refused: never imported
        assert not any(name.startswith("fla.ops.common") for name in imported_on_import(text)), path.name


def imported_on_import(source: str) -> list[str]:
    """The modules a file's import statements name outside functions: those importing the file imports."""
    names = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.ImportFrom):
                names.append(child.module or "")
            elif isinstance(child, ast.Import):
                names.extend(alias.name for alias in child.names)
            visit(child)

    visit(ast.parse(source))
    return names


def test_imports_inside_functions_are_not_counted_as_made_on_import():
    source = ("try:\n    from fla.ops.common import a\nexcept Exception:\n    pass\n"
              "def f():\n    from fla.ops.common import b\n")
    assert imported_on_import(source) == ["fla.ops.common"]
