"""Imports a Hugging Face checkpoint into a params-only exgra-jax checkpoint.

python tools/import_hf.py --hf_dir=/weights/llava-med-7b \
    --clip_dir=/weights/clip-vit-large-patch14 --out=/ckpt/llava_med_7b
python tools/import_hf.py --hf_dir=/weights/llama-7b --clip_dir=/weights/clip-vit-large-patch14 \
    --add_tokens --projector=mlp2x_gelu --out=/ckpt/stage1_init      # start of stage 1
python tools/import_hf.py --hf_dir=/weights/exgra-med-dci --clip_dir=... --connector=dci --out=...

Layouts, name maps and safety rules: docs/hf.md. Logic: exgra_jax/hf/importer.py and
exgra_jax/weights/loading.py (the output loads with `loading.load`).
"""
import json
import tempfile

from absl import app, flags

from exgra_jax import console, run_config

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF directory (llava, release or plain LLaMA)",
                              required=True)
_CLIP_DIR = flags.DEFINE_string("clip_dir", None, "CLIP directory (release and plain layouts)")
_TOKENIZER = flags.DEFINE_string("tokenizer_dir", None, "tokenizer (default: --hf_dir)")
_ADD_TOKENS = flags.DEFINE_bool("add_tokens", False, "add <pad> and the image tokens of the "
                                "style (<im_patch>, <im_start>, <im_end>, or <image>) where "
                                "missing; new rows = mean of the old rows")
_OUT = flags.DEFINE_string("out", None, "params checkpoint directory to write", required=True)
_CONNECTOR = flags.DEFINE_enum("connector", None, ["none", "dci", "sci", "sti"],
                               "connector, where the checkpoint does not say it")
_LAYERS = flags.DEFINE_list("connector_layers", None, "the two sci / sti CLIP layers, e.g. 7,15")
_PROJECTOR = flags.DEFINE_string("projector", None, "projector of a plain LLaMA start")
_IMAGE_TOKENS = flags.DEFINE_enum("image_tokens", None, ["im_start_end", "image"],
                                  "image-token style of a plain LLaMA start (a LLaVA "
                                  "checkpoint's own is read from it; data/text.py)")
_SCAN = flags.DEFINE_bool("scan_layers", None, "store the decoder layers scanned")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", None, "parameter dtype (default float32)")
_ALLOW_MISSING = flags.DEFINE_bool("allow_missing", False,
                                   "initialise missing tensors (reported) instead of failing")


def main(argv):
  del argv
  console.setup(flags.FLAGS.verbosity)
  problems = [p for p in (
      run_config.path_problem("--hf_dir", _HF_DIR.value, "dir", holding="config.json"),
      _CLIP_DIR.value and run_config.path_problem("--clip_dir", _CLIP_DIR.value, "dir",
                                                     holding="config.json")) if p]
  if problems:
    run_config.exit_usage("\n".join(problems) + "\n(a Hugging Face model directory, as "
                             "`hf download REPO --local-dir DIR` writes it)")
  from exgra_jax.hf import importer  # pylint: disable=g-import-not-at-top
  from exgra_jax.weights import loading  # pylint: disable=g-import-not-at-top
  overrides = {key: value for key, value in (
      ("connector", _CONNECTOR.value), ("projector", _PROJECTOR.value),
      ("image_tokens", _IMAGE_TOKENS.value),
      ("scan_layers", _SCAN.value), ("param_dtype", _PARAM_DTYPE.value),
      ("connector_layers", _LAYERS.value and [int(i) for i in _LAYERS.value]))
      if value is not None}
  with tempfile.TemporaryDirectory() as tokenizer_out:
    try:
      imported = importer.import_model(
          _HF_DIR.value, _CLIP_DIR.value, tokenizer_dir=_TOKENIZER.value,
          add_tokens=_ADD_TOKENS.value, tokenizer_out=tokenizer_out, overrides=overrides,
          allow_missing=_ALLOW_MISSING.value)
    except importer.USER_ERRORS as e:  # a partial download, an unsupported model: the fix
      run_config.exit_usage(str(e))
    loading.save_params(_OUT.value, imported.params, imported.model_config,
                            tokenizer_dir=imported.tokenizer_dir)
  print(json.dumps({"out": _OUT.value, "layout": imported.layout, "report": imported.report,
                    "model": imported.model_config.to_dict()}, indent=2))


if __name__ == "__main__":
  app.run(main)
