"""Exports an exgra-jax checkpoint as a Hugging Face directory.

python tools/export_hf.py --checkpoint=WORKDIR/checkpoints/finetune --out=/export/exgra-med \
    [--layout=llava|release] [--tokenizer=DIR] [--shard_size_gb=5] [--dtype=bfloat16]

--checkpoint: a train step or stage directory (its tokenizer: the run's, from
WORKDIR/config.json), a params checkpoint (tools/import_hf.py, finetune_best; its saved
tokenizer), or an HF directory. `llava` loads in transformers' LlavaForConditionalGeneration with no
custom code (connector none / sci, projector mlp2x_gelu); `release` is the LLaVA-Med
layout and holds every connector. A LoRA train checkpoint exports with its adapters
merged; `--adapter_only` writes them as a PEFT adapter instead, for `peft.PeftModel` over
`--lora_base`'s export (the model the adapters apply over: for QLoRA, its dequantized
base, not the float weights the run started from). See docs/hf.md. Logic: exgra_jax/weights/loading.py,
exgra_jax/hf/exporter.py and exgra_jax/hf/peft_adapter.py.
"""
import json

from absl import app, flags

from exgra_jax import console, run_config

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "checkpoint to export", required=True)
_OUT = flags.DEFINE_string("out", None, "HF directory to write (replaced whole)", required=True)
_LAYOUT = flags.DEFINE_enum("layout", "llava", ["llava", "release"], "HF layout")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer directory (default: the one "
                                 "saved with the checkpoint, or the run's)")
_SHARD = flags.DEFINE_float("shard_size_gb", 5.0, "largest safetensors shard")
_DTYPE = flags.DEFINE_string("dtype", None, "tensor dtype in the files (default: the params')")
_ADAPTER_ONLY = flags.DEFINE_bool("adapter_only", False, "write the LoRA adapters of a train "
                                  "checkpoint as a PEFT adapter (adapter_config.json + "
                                  "adapter_model.safetensors) instead of the merged model")


_LORA_BASE = flags.DEFINE_bool("lora_base", False, "write the model a LoRA train "
                               "checkpoint's adapters apply over (a QLoRA base dequantized): "
                               "the base for the --adapter_only adapter")


def main(argv):
  del argv
  console.setup(flags.FLAGS.verbosity)
  from exgra_jax.hf import importer  # pylint: disable=g-import-not-at-top
  from exgra_jax.weights import loading  # pylint: disable=g-import-not-at-top
  problems = [p for p in (
      run_config.model_problem("--checkpoint", _CHECKPOINT.value),
      run_config.url_problem("--out", _OUT.value),
      _TOKENIZER.value and run_config.path_problem("--tokenizer", _TOKENIZER.value, "dir"))
      if p]
  run_config.exit_on_problems(problems)
  try:
    if _ADAPTER_ONLY.value:
      print(json.dumps(_peft_adapter(), indent=2))
      return
    result = loading.export_checkpoint(
        _CHECKPOINT.value, _OUT.value, tokenizer_dir=_TOKENIZER.value, layout=_LAYOUT.value,
        shard_size_gb=_SHARD.value, dtype=_DTYPE.value,
        lora_base="--lora_base" if _LORA_BASE.value else "")
  except (*importer.USER_ERRORS, loading.NoTokenizer, loading.NoAdapters) as e:  # says the fix
    run_config.exit_usage(str(e))
  print(json.dumps(result, indent=2))


def _peft_adapter() -> dict:
  """--adapter_only: the checkpoint's LoRA adapters as a PEFT adapter directory."""
  from exgra_jax.hf import peft_adapter  # pylint: disable=g-import-not-at-top
  from exgra_jax.models import adapters  # pylint: disable=g-import-not-at-top
  from exgra_jax.weights import loading  # pylint: disable=g-import-not-at-top
  loaded = loading.load(_CHECKPOINT.value, tokenizer_dir=_TOKENIZER.value, keep_adapters=True)
  try:
    loading.require_adapters(loaded, "--adapter_only")
  except loading.NoAdapters as e:
    run_config.exit_usage(str(e))
  lora = loading.run_lora_settings(loaded.path)
  try:
    return peft_adapter.write_peft_adapter(loaded.params, loaded.model_config.to_dict(),
                                           _OUT.value, rank=lora.rank, alpha=lora.alpha,
                                           dropout=lora.dropout, train_also=lora.train_also)
  except ValueError as e:  # train_also: the message says the fix
    run_config.exit_usage(str(e))


if __name__ == "__main__":
  app.run(main)
