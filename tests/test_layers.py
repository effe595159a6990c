"""The package layering (docs/interfaces.md): a package imports only from layers below it.

Bottom up: ground (models/, align/, data/, temp_paths) -> hf/ (HF files <-> Flax arrays)
-> weights/ (any checkpoint in or out, the parameter checksum) -> eval/ -> train/ (the
fine-tune's model selection calls eval/) -> configuration, main.py, predict.py, serving/
(serve.py, chat.py). Imports
inside functions count too. The ground packages import none of each other.
"""
import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "exgra_jax")
RANK = {"models": 0, "align": 0, "data": 0, "temp_paths": 0, "hf": 1, "weights": 2,
        "eval": 3, "train": 4, "configuration": 5, "main": 5, "predict": 5,
        "serving": 5, "serve": 5, "chat": 5}
GROUND = ("models", "align", "data")  # none imports another (helper modules are fine)


def _unit(relative: str) -> str:
  return relative.split(os.sep)[0].removesuffix(".py")


def _imports():
  """-> [(file, importing unit, imported unit)] over every module of the package."""
  out = []
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if not name.endswith(".py") or name == "__init__.py" and root == PACKAGE:
        continue
      path = os.path.join(root, name)
      unit = _unit(os.path.relpath(path, PACKAGE))
      with open(path) as f:
        tree = ast.parse(f.read())
      for node in ast.walk(tree):
        modules = []
        if isinstance(node, ast.ImportFrom) and node.module:
          modules = ([f"{node.module}.{a.name}" for a in node.names]
                     if node.module == "exgra_jax" else [node.module])
        elif isinstance(node, ast.Import):
          modules = [a.name for a in node.names]
        for module in modules:
          if module.startswith("exgra_jax."):
            out.append((path, unit, module.split(".")[1]))
  return out


def _rank(unit: str) -> int:
  return RANK.get(unit, 0)  # another top-level helper module: ground, unless it imports more


def test_every_package_has_a_layer():
  packages = {p for p in os.listdir(PACKAGE) if os.path.isdir(os.path.join(PACKAGE, p))
              and not p.startswith(("_", "."))}
  assert packages <= set(RANK), packages - set(RANK)


def test_no_import_from_a_layer_above():
  wrong = [f"{path} ({unit}) imports {imported}" for path, unit, imported in _imports()
           if _rank(imported) > _rank(unit)
           or unit in GROUND and imported in GROUND and imported != unit]
  assert not wrong, wrong
