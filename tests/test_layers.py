"""The package layering (docs/interfaces.md): a package imports only from layers below it,
and no module imports itself back through others.

Bottom up: ground (models/, align/, data/, run_paths, temp_paths, console) -> hf/ (HF
files <-> Flax arrays) -> weights/ (any checkpoint in or out, the parameter checksum) ->
inference/ (a loaded model answering: prompts, pixels, generation) -> eval/ (protocols,
metrics, reports) -> train/ (the fine-tune's model selection calls eval/) and llm_clients/
(outside LLM endpoints) -> run_config, main.py, predict.py, serving/ (serve.py, chat.py).
Imports inside functions count too. The ground packages import none of each other; nothing
in the package imports experiments/ or tools/.
"""
import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "exgra_jax")
RANK = {"models": 0, "align": 0, "data": 0, "run_paths": 0, "temp_paths": 0, "console": 0,
        "startup_noise": 0, "__init__": 0,  # the package's own __init__ runs first: ground only
        "hf": 1, "weights": 2, "inference": 3, "eval": 4, "train": 5, "llm_clients": 5,
        "run_config": 6, "model_flags": 7, "main": 7, "predict": 7, "serving": 7, "serve": 7,
        "chat": 7}
GROUND = ("models", "align", "data")  # none imports another (helper modules are fine)


def _unit(relative: str) -> str:
  return relative.split(os.sep)[0].removesuffix(".py")


def _modules() -> dict[str, str]:
  """{dotted module name: file} of every module of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        dotted = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
        out[dotted.removesuffix(".__init__")] = path
  return out


def _imported(tree: ast.AST, modules: dict[str, str]) -> list[str]:
  """Dotted names a module imports (`from pkg import mod` counts as `pkg.mod`)."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      subs = [f"{node.module}.{a.name}" for a in node.names]
      out += [s for s in subs if s in modules] or [node.module]
    elif isinstance(node, ast.Import):
      out += [a.name for a in node.names]
  return out


def _imports():
  """-> [(file, importing module, imported module)] over every module of the package."""
  modules = _modules()
  out = []
  for dotted, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    out += [(path, dotted, m) for m in _imported(tree, modules)
            if m.split(".")[0] in ("exgra_jax", "experiments", "tools")]
  return out


def _rank(unit: str) -> int:
  return RANK.get(unit, 0)  # another top-level helper module: ground, unless it imports more


def test_every_package_has_a_layer():
  packages = {p for p in os.listdir(PACKAGE) if os.path.isdir(os.path.join(PACKAGE, p))
              and not p.startswith(("_", "."))}
  assert packages <= set(RANK), packages - set(RANK)


def test_no_import_from_a_layer_above():
  wrong = []
  for path, importer, imported in _imports():
    if not imported.startswith("exgra_jax."):
      wrong.append(f"{path} imports {imported} (outside the library)")
      continue
    unit = importer.split(".")[1] if "." in importer else "__init__"
    other = imported.split(".")[1]
    if _rank(other) > _rank(unit) or unit in GROUND and other in GROUND and other != unit:
      wrong.append(f"{path} ({unit}) imports {other}")
  assert not wrong, wrong


def test_no_import_cycles():
  """Between modules, imports inside functions included (one hides a circle otherwise)."""
  graph: dict[str, set[str]] = {}
  for _, importer, imported in _imports():
    if imported != importer and imported in _modules():
      graph.setdefault(importer, set()).add(imported)
  done: set[str] = set()

  def cycle_from(node: str, trail: list[str]) -> list[str] | None:
    if node in trail:
      return trail[trail.index(node):] + [node]
    if node in done:
      return None
    for nxt in sorted(graph.get(node, ())):
      found = cycle_from(nxt, trail + [node])
      if found:
        return found
    done.add(node)
    return None

  for start in sorted(graph):
    found = cycle_from(start, [])
    assert found is None, " -> ".join(found)
