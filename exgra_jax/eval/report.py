"""The protocol report written beside every evaluation's answers (docs/eval.md).

Why: published VQA numbers of LLaVA-Med-style models are often not reproducible because
the protocol is implicit (candidate file, template, a tower that failed to load, open /
closed counts). The report makes it explicit and checkable: the parameter checksum of the
evaluated weights (weights/checksum.py: the one the training summary and
tools/inspect_checkpoint.py print), sha256 of every data file, split sizes, template text, decoding settings, metric definitions and
version, and the metrics, as `protocol.json` plus a short `protocol.md` table.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from exgra_jax import temp_paths
from exgra_jax.eval.vqa_metrics import METRIC_DEFINITIONS, METRICS_VERSION
from exgra_jax.weights.loading import require_complete_weights

_CHUNK = 1 << 20


def sha256_path(path: str) -> str:
  """sha256 of a file, or of a directory as its sorted (relative path, content) pairs."""
  digest = hashlib.sha256()
  if os.path.isdir(path):
    files = sorted(os.path.relpath(os.path.join(root, name), path)
                   for root, _, names in os.walk(path) for name in names)
    for name in files:
      digest.update(name.encode() + b"\0")
      digest.update(bytes.fromhex(sha256_path(os.path.join(path, name))))
    return digest.hexdigest()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      digest.update(block)
  return digest.hexdigest()


def build_report(*, checkpoint: str, params_checksum: str, data_files: Mapping[str, str],
                 template: str, decoding: Mapping[str, Any], metrics: Mapping[str, Any],
                 load_report: Mapping[str, Any]) -> dict[str, Any]:
  """The protocol as a JSON-able dict; refuses incomplete weights first."""
  require_complete_weights(load_report)
  split = {name: metrics[name]["count"] for name in ("OPEN", "CLOSED", "overall")
           if name in metrics}
  return {
      "checkpoint": {"path": os.path.abspath(checkpoint), "params_checksum": params_checksum,
                     "unexpected_parameters": list(load_report.get("unexpected", []))},
      "data_files": {name: {"path": os.path.abspath(path), "sha256": sha256_path(path)}
                     for name, path in data_files.items()},
      "split_sizes": split,
      "template": template,
      "decoding": dict(decoding),
      "metrics_version": METRICS_VERSION,
      "metric_definitions": METRIC_DEFINITIONS,
      "metrics": dict(metrics),
  }


def markdown_table(report: Mapping[str, Any]) -> str:
  """A short human-readable summary of the report's headline numbers."""
  metrics = report["metrics"]
  rows = [("params checksum", report["checkpoint"]["params_checksum"][:16]),
          ("metrics version", report["metrics_version"]),
          ("open / closed", f"{report['split_sizes'].get('OPEN', 0)} / "
                            f"{report['split_sizes'].get('CLOSED', 0)}")]
  for name in ("open_recall", "closed_accuracy", "selection_score"):
    value = metrics.get(name)
    rows.append((name, "n/a" if value is None else f"{100 * value:.2f}"))
  for name, value in sorted(report["decoding"].items()):
    rows.append((f"decoding.{name}", str(value)))
  lines = ["| item | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
  return "\n".join(lines) + "\n"


def write_report(directory: str, report: Mapping[str, Any]) -> None:
  """Writes protocol.json and protocol.md into `directory` (created if needed), each
  through a temporary of its own and a rename; call it from one process."""
  os.makedirs(directory, exist_ok=True)
  temp_paths.remove_stale(directory)
  for name, text in (("protocol.json", json.dumps(report, indent=2, sort_keys=True)),
                     ("protocol.md", markdown_table(report))):
    temp_paths.replace_file(os.path.join(directory, name), text)
