"""Flax params + `config.model` -> a Hugging Face directory (layouts `llava` or `release`).

    export(params, model_config, "/out/llava", tokenizer_dir=tok, layout="llava")
    transformers.LlavaForConditionalGeneration.from_pretrained("/out/llava")  # no custom code

Written: `config.json`, safetensors shards of at most `shard_size_gb` with
`model.safetensors.index.json`, the tokenizer with the training template as its chat
template (data/text.py `chat_template`), `preprocessor_config.json` (CLIP preprocessing at
the model's image size, as data/images.py does it) and `generation_config.json` (greedy,
eos and the stop string `###` the model learned to end its turn with, so that `generate`
stops where exgra_jax.predict cuts the answer; transformers needs
`generate(..., tokenizer=...)` to apply stop strings). The `llava` layout also writes a
`LlavaProcessor` (`processor_config.json`) whose image token, `patch_size`,
`num_additional_image_tokens` and `vision_feature_select_strategy` (the model's
`vision.feature_select`) give the model's N image tokens:

    processor = AutoProcessor.from_pretrained(out)
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    model.generate(**inputs, tokenizer=processor.tokenizer)
 The `release` layout
also writes the CLIP tower as a CLIPVisionModel directory `vision_tower/` that
`mm_vision_tower` names (the importer resolves it relative to the export). Both configs
carry `exgra_connector`, `exgra_connector_layers` and `exgra_name`, so export -> import
gives the same `config.model`.

The `llava` layout is refused for models transformers cannot compute (connector dci / sti,
projector other than mlp2x_gelu): a directory that loads but computes something else would
be worse than an error; the `release` layout holds every model.

The directory appears whole or not at all: everything is written to a temporary sibling
that replaces `out_dir` by rename. Tensors stream leaf by leaf (one layer of a scanned
leaf at a time), gathered from all hosts where sharded; only process 0 writes.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import transformers
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils

from exgra_jax import temp_paths
from exgra_jax.data import images as images_lib
from exgra_jax.data import text as text_lib
from exgra_jax.hf import hf_configs, layouts, placement
from exgra_jax.hf.weights_io import replace_directory, write_shards
from exgra_jax.models.config import LlavaConfig, num_image_tokens

EXPORT_LAYOUTS = ("llava", "release")
GB = 1 << 30


def _host(x: Any) -> np.ndarray:
  """A (possibly multi-host sharded) array -> the whole array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _tensors(flat: Mapping[layouts.Path, Any], entries: list[layouts.Entry], cfg: LlavaConfig,
             source: str, dtype: np.dtype | None) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, torch-layout host array) of the entries of `source`, in table order."""
  for entry in entries:
    if entry.source != source:
      continue
    path, index = layouts.param_location(entry.path, cfg.llm)
    if path not in flat:
      raise KeyError(f"params lack {placement.path_name(path)} (needed for {entry.name})")
    leaf = flat[path] if index is None else flat[path][index]
    host = _host(leaf)
    yield entry.name, entry.to_hf(host if dtype is None else host.astype(dtype))


def _write_weights(tensors: Iterator[tuple[str, np.ndarray]], directory: str,
                   shard_bytes: int) -> dict[str, int]:
  if jax.process_index() == 0:
    return write_shards(tensors, directory, shard_bytes)
  for _ in tensors:  # other processes take part in the gathers only
    pass
  return {}


def _image_processor(image_size: int) -> transformers.CLIPImageProcessor:
  return transformers.CLIPImageProcessor(
      size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
      image_mean=list(images_lib.CLIP_MEAN), image_std=list(images_lib.CLIP_STD))


def _llava_processor(cfg: LlavaConfig, tok) -> transformers.LlavaProcessor:
  """The processor that expands the chat template's image token to the model's N."""
  processor = transformers.LlavaProcessor(
      image_processor=_image_processor(cfg.vision.image_size), tokenizer=tok,
      patch_size=cfg.vision.patch_size,
      vision_feature_select_strategy=cfg.vision.feature_select,
      num_additional_image_tokens=1,  # the CLS token, which "default" drops again
      image_token=text_lib.patch_token(cfg.image_tokens), chat_template=tok.chat_template)
  side = cfg.vision.image_size // cfg.vision.patch_size
  count = side * side + 1 - (cfg.vision.feature_select == "default")  # as the processor counts
  if count != num_image_tokens(cfg):
    raise ValueError(f"a LlavaProcessor gives {count} image tokens, the model takes "
                     f"{num_image_tokens(cfg)}")
  return processor


def _generation_config(tok) -> transformers.GenerationConfig:
  return transformers.GenerationConfig(
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id, do_sample=False, max_new_tokens=1024,
      stop_strings=[text_lib.BEGIN_SIGNAL.strip()])


def _write_json_config(config: dict[str, Any], directory: str) -> None:
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)


def export(params: Mapping[str, Any], model_config: ml_collections.ConfigDict | Mapping[str, Any],
           out_dir: str, *, tokenizer_dir: str, layout: str = "llava",
           shard_size_gb: float = 5.0, dtype: str | None = None) -> dict[str, Any]:
  """Writes `params` ({vision, projector, llm}; other collections such as `gnn` are not
  exported) as an HF directory; -> dict(out_dir, layout, tensors, bytes, files).

  dtype: tensor dtype in the files ("bfloat16", "float32", ...; default the params' own).
  """
  if layout not in EXPORT_LAYOUTS:
    raise ValueError(f"layout={layout!r} is not one of {EXPORT_LAYOUTS}")
  cfg = placement.typed_config(model_config)
  if layout == "llava" and (problem := hf_configs.transformers_llava_problem(cfg)):
    raise ValueError(f"layout 'llava' cannot hold this model: {problem}; export it with "
                     "layout='release'")
  if layout == "release" and cfg.image_tokens != "im_start_end":
    raise ValueError(f"layout 'release' holds <im_start> / <im_end> models only; this one has "
                     f"image_tokens={cfg.image_tokens!r}: export it with layout='llava'")
  tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
  text_lib.check_tokenizer(tok, cfg.image_tokens)
  tok.chat_template = text_lib.chat_template(cfg.image_tokens)
  if len(tok) > cfg.llm.vocab_size:
    raise ValueError(f"tokenizer {tokenizer_dir} has {len(tok)} tokens, the model "
                     f"{cfg.llm.vocab_size} embedding rows")
  token_ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
               "pad_token_id": tok.pad_token_id}
  out_dtype = None if dtype is None else np.dtype(jax.numpy.dtype(dtype))
  flat = traverse_util.flatten_dict(dict(params))
  stored = str(out_dtype or np.dtype(flat[("llm", "norm", "scale")].dtype))
  entries = layouts.layout_entries(layout, cfg)
  shard_bytes = max(1, int(shard_size_gb * GB))

  out_dir = os.path.abspath(out_dir)
  is_writer = jax.process_index() == 0
  tmp = None
  if is_writer:
    tmp = temp_paths.new_dir(os.path.dirname(out_dir), os.path.basename(out_dir))
  try:
    weights = _write_weights(_tensors(flat, entries, cfg, layouts.MAIN, out_dtype), tmp,
                             shard_bytes)
    clip_dir = tmp and os.path.join(tmp, hf_configs.RELEASE_CLIP_SUBDIR)
    if layout == "release":
      if is_writer:
        os.makedirs(clip_dir)
      clip = _write_weights(_tensors(flat, entries, cfg, layouts.CLIP, out_dtype), clip_dir,
                            shard_bytes)
      weights = {k: weights.get(k, 0) + clip.get(k, 0) for k in weights}
    if is_writer:
      if layout == "llava":
        config = hf_configs.llava_hf_config(
            cfg, tok.convert_tokens_to_ids(text_lib.patch_token(cfg.image_tokens)),
            text_extra=token_ids).to_dict()
        config["architectures"] = [hf_configs.LAYOUT_ARCHITECTURES["llava"]]
        config.update(hf_configs.exgra_keys(cfg))
      else:
        config = hf_configs.release_config_dict(cfg, **token_ids)
        clip_config = hf_configs.clip_hf_config(cfg.vision).to_dict()
        clip_config.update(architectures=["CLIPVisionModel"], dtype=stored)
        _write_json_config(clip_config, clip_dir)
        _image_processor(cfg.vision.image_size).save_pretrained(clip_dir)
      config["dtype"] = stored
      _write_json_config(config, tmp)
      if layout == "llava":
        _llava_processor(cfg, tok).save_pretrained(tmp)  # processor_config.json, tokenizer
      else:
        tok.save_pretrained(tmp)
      # preprocessor_config.json too: AutoImageProcessor and older transformers read it.
      _image_processor(cfg.vision.image_size).save_pretrained(tmp)
      _generation_config(tok).save_pretrained(tmp)
      replace_directory(tmp, out_dir)
      logging.info("exported %d tensors (%.2f GB) to %s (%s layout)", weights["tensors"],
                   weights["bytes"] / GB, out_dir, layout)
  except BaseException:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  multihost_utils.sync_global_devices("exgra_jax.hf.export")
  return {"out_dir": out_dir, "layout": layout, **weights}

