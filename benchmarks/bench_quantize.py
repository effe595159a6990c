"""Weight-only int8 / int4 answering (`--quantize`) against full precision on a trained run.

Loads the run's model three times through the loader every answering command shares
(eval/single_question.load_for_generation: as stored, int8, int4), answers the run's VQA
test split with the run's eval settings (config.eval template and greedy decoding, the same
evaluate_split `--mode=eval` runs), and prints per variant: the fraction of questions whose
answer equals the full-precision one (agreement), test closed accuracy and open recall, and
the bytes of the weights (each leaf's element count x its dtype's bits / 8; int4 counted
at 4 bits, qwix's per-channel scales included).

    python -m benchmarks.bench_quantize --workdir=/tmp/h25/demo --out=/tmp/bench_quantize

--workdir is a finished train run (its config.json and checkpoints/finetune_best);
--limit answers only the first N test questions. Answers files go to --out/<variant>
(resumable: a rerun with the same --out reuses them).
"""
import json
import os
import tempfile
import time

from absl import app, flags

import jax
import jax.numpy as jnp
import ml_collections

from exgra_jax import run_paths
from exgra_jax.eval import vqa, vqa_metrics
from exgra_jax.inference import single_question

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "finished train run (config.json + checkpoints)",
                    required=True)
flags.DEFINE_string("checkpoint", "", "model directory; default: the run's eval checkpoint")
flags.DEFINE_string("out", "", "answers folder (default: a new temporary folder)")
flags.DEFINE_integer("limit", 0, "answer only the first N test questions (0: all)")
flags.DEFINE_list("variants", ["float", "int8", "int4"], "float (as stored), int8, int4")


def weight_bytes(params) -> int:
  """Bytes of every array leaf at its dtype's bit width (qwix QArray values and scales)."""
  total = 0
  for leaf in jax.tree.leaves(params):
    dtype = jnp.dtype(leaf.dtype)
    bits = (jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer)
            else jnp.finfo(dtype).bits)
    total += leaf.size * bits // 8
  return total


def main(argv):
  del argv
  run = run_paths.RunDir(FLAGS.workdir)
  config = ml_collections.ConfigDict(json.loads(run.config_json.read_text()))
  checkpoint = FLAGS.checkpoint or str(run.answering_checkpoint(config.stages))
  out = FLAGS.out or tempfile.mkdtemp(prefix="bench_quantize_")
  records = str(vqa.vqa_inputs(config, config.finetune.test_records).data_files["records"])
  if FLAGS.limit:
    items = vqa_metrics.read_json_or_jsonl(records)[:FLAGS.limit]
    records = os.path.join(out, "test_records.json")
    os.makedirs(out, exist_ok=True)
    with open(records, "w", encoding="utf-8") as f:
      json.dump(items, f)
  rows, answers = [], {}
  for variant in FLAGS.variants:
    start = time.perf_counter()
    model, params, _ = single_question.load_for_generation(
        checkpoint, tokenizer_dir=run_paths.tokenizer_dir(config),
        quantize="" if variant == "float" else variant)
    output_dir = os.path.join(out, variant)
    # load_for_generation has refused incomplete weights already.
    metrics = vqa.evaluate_split(config, model, params, records=records,
                                 image_root=config.finetune.image_root,
                                 candidates=config.finetune.candidates,
                                 output_dir=output_dir, checkpoint=checkpoint,
                                 load_report={"missing": []})
    with open(os.path.join(output_dir, "answers.jsonl"), encoding="utf-8") as f:
      answers[variant] = {r["question_id"]: r["text"] for r in map(json.loads, f)}
    rows.append((variant, metrics, weight_bytes(params), time.perf_counter() - start))
  reference = answers[FLAGS.variants[0]]
  print(f"checkpoint {checkpoint}: {len(reference)} test questions, greedy, "
        f"template {config.eval.template!r}, max_new_tokens {config.eval.max_new_tokens}")
  print(f"| variant | agreement with {FLAGS.variants[0]} | closed accuracy | open recall | "
        "weight bytes | bytes ratio | seconds |")
  print("|---|---|---|---|---|---|---|")
  for variant, metrics, size, seconds in rows:
    same = sum(answers[variant][q] == a for q, a in reference.items()) / len(reference)
    print(f"| {variant} | {same:.4f} | {metrics['closed_accuracy']:.4f} | "
          f"{metrics['open_recall']:.4f} | {size:,} | {size / rows[0][2]:.3f} | "
          f"{seconds:.0f} |")


if __name__ == "__main__":
  app.run(main)
