"""Hugging Face checkpoint directory -> our `config.model` tree + Flax params, streamed.

    imported = import_model("/weights/llava-med-7b", "/weights/clip-vit-large-patch14")

The layout (docs/hf.md) is read from `config.json`; the model config is derived from the
checkpoint's configs (hf_configs.py). Tensors are checked by name and shape before any
data is read, then read one Flax leaf at a time (a scanned leaf stacks its L layers on
the host), converted, cast to the parameter dtype and placed directly in its target
sharding: peak host memory is one leaf, and no device ever holds more than its shards.
Only safetensors and weights-only `.bin` files are read (weights_io.py); no code from the
checkpoint runs (no `trust_remote_code`, no pickle).

Image-token style (`config.model.image_tokens`, data/text.py): a transformers LLaVA
checkpoint's is the token at its `image_token_index` (`<image>`: llava-hf, N x `<image>`;
`<im_patch>`: LLaVA-Med v1), a release checkpoint's `im_start_end`, a plain LLaMA's the
`image_tokens` override (default `im_start_end`). An override that disagrees with the
checkpoint is an error, not a silent re-interpretation.

New tokens (`add_tokens`): the tokens the style needs and the tokenizer lacks (`<pad>`,
then for `im_start_end` `<im_patch>`, `<im_start>`, `<im_end>`, in the release's order;
`<image>` for `image`) are added to the tokenizer (written to `tokenizer_out`), and their
embedding and LM-head rows are the mean of the existing rows (LLaVA's recipe). Nothing is
added that the style does not use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import transformers
from flax import traverse_util

from exgra_jax.data import text as text_lib
from exgra_jax.hf import hf_configs, layouts, placement
from exgra_jax.hf.weights_io import DOWNLOAD, TensorReader, UnsupportedWeightsError

PAD_TOKEN = "<pad>"
# The patch token of a transformers LLaVA checkpoint -> its image-token style.
STYLE_OF_PATCH_TOKEN = {text_lib.patch_token(s): s for s in text_lib.IMAGE_TOKEN_STYLES}


# The entries of one Flax leaf with their layer index (None: an unscanned leaf, one entry).
Group = list[tuple[int | None, layouts.Entry]]


class MissingTensorsError(ValueError):
  """The checkpoint lacks tensors the model needs (and missing ones were not allowed)."""


class ShapeMismatchError(ValueError):
  """A tensor's shape does not fit the model the configs describe."""


class IncompleteCheckpointError(ValueError):
  """The directory lacks a part the import needs (tokenizer, CLIP tower): a partial download."""


# Files one of which a tokenizer directory holds (fast, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
# The errors of a checkpoint directory a person can fix (the message says how): command
# lines print them as one `error:` line instead of a traceback.
USER_ERRORS = (MissingTensorsError, ShapeMismatchError, IncompleteCheckpointError,
               hf_configs.UnsupportedCheckpointError, UnsupportedWeightsError)


@dataclasses.dataclass
class ImportedModel:
  """`params` ({vision, projector, llm} of jax.Arrays) for `model_config` (a `config.model`).

  `report`: `missing` (HF names the checkpoint lacks; their leaves were initialised),
  `unexpected` (names in the files this model does not use), `initialised` (Flax paths
  set by `LlavaModel.init`: the projector of a plain import, leaves with missing tensors),
  `added_tokens`.
  """
  model_config: ml_collections.ConfigDict
  params: dict[str, Any]
  tokenizer_dir: str
  report: dict[str, list[str]]
  layout: str


def _clip_directory(layout: str, config: Mapping[str, Any], hf_dir: str,
                    clip_dir: str | None) -> str | None:
  if layout == "llava":
    if clip_dir:
      raise ValueError("a transformers LLaVA directory holds its CLIP tower; clip_dir is "
                       "only for the release and plain layouts")
    return None
  clip_dir = clip_dir or (hf_configs.release_clip_dir(config, hf_dir)
                          if layout == "release" else None)
  if not clip_dir:
    named = config.get("mm_vision_tower")
    raise IncompleteCheckpointError(
        f"{hf_dir} ({layout} layout) has no CLIP weights: pass clip_dir (--clip_dir: a local "
        "CLIPVisionModel or CLIPModel directory, e.g. openai/clip-vit-large-patch14 "
        f"downloaded with {DOWNLOAD})"
        + (f"; mm_vision_tower={named!r} is not a local directory" if named else ""))
  return os.path.abspath(clip_dir)


def _image_tokens(layout: str, config: Mapping[str, Any], tokenizer_dir: str,
                  requested: str | None) -> str:
  """The checkpoint's image-token style (module docstring); ValueError on a disagreement."""
  if layout == "plain":
    return requested or text_lib.DEFAULT_IMAGE_TOKENS
  found = text_lib.DEFAULT_IMAGE_TOKENS
  if layout == "llava":
    tok = _load_tokenizer(tokenizer_dir)
    token = tok.convert_ids_to_tokens(int(config["image_token_index"]))
    if token not in STYLE_OF_PATCH_TOKEN:
      raise hf_configs.UnsupportedCheckpointError(
          f"{tokenizer_dir}: image_token_index={config['image_token_index']} is {token!r}; "
          f"supported image tokens: {sorted(STYLE_OF_PATCH_TOKEN)}")
    found = STYLE_OF_PATCH_TOKEN[token]
  if requested is not None and requested != found:
    raise ValueError(f"the checkpoint uses image_tokens={found!r}, the config asks for "
                     f"{requested!r}: set config.model.image_tokens={found!r}")
  return found


def _load_tokenizer(tokenizer_dir: str) -> transformers.PreTrainedTokenizerBase:
  """The local tokenizer; a directory without tokenizer files is an incomplete download
  (transformers would fail with an unrelated message about sentencepiece)."""
  if not any(os.path.exists(os.path.join(tokenizer_dir, f)) for f in TOKENIZER_FILES):
    raise IncompleteCheckpointError(
        f"{tokenizer_dir} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): download "
        f"the whole repository ({DOWNLOAD}), or name the tokenizer's directory "
        "(tokenizer_dir, --tokenizer_dir)")
  return transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def _add_tokens(tokenizer_dir: str, tokenizer_out: str | None, image_tokens: str
                ) -> tuple[int, list[str]]:
  """Adds the missing pad and style tokens, saves to `tokenizer_out`; -> (tokenizer length,
  added)."""
  tok = _load_tokenizer(tokenizer_dir)
  vocab = tok.get_vocab()
  added = []
  if tok.pad_token is None:
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
    added.append(PAD_TOKEN)
  patch = text_lib.patch_token(image_tokens)  # first: the release's order
  wanted = (patch, *(t for t in text_lib.style_tokens(image_tokens) if t != patch))
  new = [t for t in wanted if t not in vocab]
  if new:
    tok.add_tokens(new, special_tokens=True)
    added += new
  if added:
    if not tokenizer_out:
      raise ValueError(f"adding {added} needs tokenizer_out, the directory to write the "
                       "extended tokenizer to")
    if jax.process_index() == 0:
      tok.save_pretrained(tokenizer_out)
  return len(tok), added


class _Sources:
  """The checkpoint's readers by Entry.source, with canonical-name lookup."""

  def __init__(self, layout: str, readers: Mapping[str, TensorReader],
               entries: Sequence[layouts.Entry]):
    self.readers = readers
    self.raw: dict[str, str] = {}  # canonical name -> name in the file
    wanted = {e.name for e in entries}
    self.unexpected: list[str] = []
    for source, reader in readers.items():
      for raw in reader.names():
        name = layouts.canonical_name(layout, source, raw)
        if name is None:
          continue
        if name in wanted:
          self.raw[name] = raw
        else:
          self.unexpected.append(raw if source == layouts.MAIN else f"{source}:{raw}")

  def has(self, entry: layouts.Entry) -> bool:
    return entry.name in self.raw

  def shape(self, entry: layouts.Entry) -> tuple[int, ...]:
    return self.readers[entry.source].shape(self.raw[entry.name])

  def read(self, entry: layouts.Entry) -> np.ndarray:
    return self.readers[entry.source].read(self.raw[entry.name])

  def check_shapes(self, path: layouts.Path, group: Group, leaf_shape: tuple[int, ...],
                   checkpoint_vocab: int) -> None:
    """Raises ShapeMismatchError for a stored tensor that does not fit leaf `path`."""
    for index, entry in group:
      if not self.has(entry):
        continue
      want = _expected_hf_shape(entry, leaf_shape if index is None else leaf_shape[1:],
                                checkpoint_vocab)
      found = tuple(self.shape(entry))
      if found != want:
        raise ShapeMismatchError(
            f"{self.readers[entry.source].file_of(self.raw[entry.name])}: tensor "
            f"{entry.name}: expected shape {want} for {placement.path_name(path)} "
            f"(as the checkpoint's config.json describes the model), found {found}")

  def read_leaf(self, group: Group, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
    """The host value of one Flax leaf: one tensor, or a scanned leaf's L layers stacked."""
    dtype = np.dtype(leaf.dtype)
    if group[0][0] is None:
      return _convert(group[0][1], self.read(group[0][1]), leaf.shape, dtype)
    host = np.empty(leaf.shape, dtype)
    for index, entry in group:
      host[index] = _convert(entry, self.read(entry), leaf.shape[1:], dtype)
    return host


def _expected_hf_shape(entry: layouts.Entry, flax_shape: tuple[int, ...],
                       checkpoint_vocab: int) -> tuple[int, ...]:
  """The shape the file must hold: the Flax shape in torch layout, old vocab for vocab leaves."""
  shape = list(flax_shape)
  axis = layouts.VOCAB_AXES.get(entry.path)
  if axis is not None:
    shape[axis] = checkpoint_vocab
  return entry.hf_shape(tuple(shape))


def _convert(entry: layouts.Entry, x: np.ndarray, flax_shape: tuple[int, ...],
             dtype: np.dtype) -> np.ndarray:
  """torch-layout tensor -> Flax leaf in `dtype`; new vocab rows = mean of the old rows."""
  axis = layouts.VOCAB_AXES.get(entry.path)
  y = entry.to_flax(x).astype(dtype)
  if axis is not None and y.shape[axis] < flax_shape[axis]:
    mean = y.astype(np.float32).mean(axis=axis, keepdims=True).astype(dtype)
    extra = flax_shape[axis] - y.shape[axis]
    y = np.concatenate([y, np.repeat(mean, extra, axis=axis)], axis=axis)
  return y


def import_model(hf_dir: str, clip_dir: str | None = None, *, tokenizer_dir: str | None = None,
                 add_tokens: bool = False, tokenizer_out: str | None = None,
                 overrides: Mapping[str, Any] | None = None,
                 mesh: jax.sharding.Mesh | None = None,
                 rules: Sequence[Sequence[Any]] | None = None, allow_missing: bool = False,
                 seed: int = 0, text_only: bool = False) -> ImportedModel:
  """Imports a local HF directory (layouts: llava, release, plain; see module docstring).

  clip_dir: CLIP tower for the release / plain layouts (default for release: the local
    directory `mm_vision_tower` names, relative to hf_dir or absolute).
  tokenizer_dir: where the tokenizer is (default hf_dir).
  overrides: top-level `config.model` keys (hf_configs.OVERRIDABLE), e.g. scan_layers,
    param_dtype, or the projector of a plain start / the connector of a release -dci.
  mesh, rules: place every leaf in the sharding its logical axes get under `rules`
    (config.logical_axis_rules); without a mesh, on this process's first device.
  allow_missing: initialise leaves whose tensors are missing (listed in report) instead of
    raising MissingTensorsError.
  seed: PRNG seed of the initialised leaves (plain layout projector, missing ones).
  text_only: import the LLM alone (`params` = {"llm": ...}; the tower and projector
    tensors are neither read nor reported), so that a plain LLaMA or a release directory
    needs no CLIP directory (its model config then has a stand-in vision part).
  """
  hf_dir = os.path.abspath(hf_dir)
  config = hf_configs.read_json(os.path.join(hf_dir, "config.json"))
  layout = hf_configs.detect_layout(config, hf_dir)
  clip_dir = None if text_only else _clip_directory(layout, config, hf_dir, clip_dir)
  clip_config = (hf_configs.read_json(os.path.join(clip_dir, "config.json"))
                 if clip_dir else None)
  overrides = dict(overrides or {})
  requested = overrides.pop("image_tokens", None)
  tokenizer_dir = os.path.abspath(tokenizer_dir or hf_dir)
  cfg = dataclasses.replace(
      hf_configs.model_config_from_hf(layout, config, clip_config,
                                      name=os.path.basename(hf_dir), overrides=overrides),
      image_tokens=_image_tokens(layout, config, tokenizer_dir, requested))
  checkpoint_vocab = cfg.llm.vocab_size
  added: list[str] = []
  if add_tokens:
    length, added = _add_tokens(tokenizer_dir, tokenizer_out, cfg.image_tokens)
    if added:
      tokenizer_dir = os.path.abspath(tokenizer_out)
    if length > checkpoint_vocab:
      cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=length))

  entries = layouts.layout_entries(layout, cfg)
  abstract, shardings = placement.expected_params(cfg, mesh, rules)
  if text_only:
    abstract = {path: leaf for path, leaf in abstract.items() if path[0] == "llm"}
  groups: dict[layouts.Path, Group] = {}
  imported = []
  for entry in entries:
    path, index = layouts.param_location(entry.path, cfg.llm)
    if path in abstract:
      groups.setdefault(path, []).append((index, entry))
      imported.append(entry)

  with contextlib.ExitStack() as stack:
    readers = {layouts.MAIN: stack.enter_context(TensorReader(hf_dir))}
    if clip_dir:
      readers[layouts.CLIP] = stack.enter_context(TensorReader(clip_dir))
    sources = _Sources(layout, readers, entries)
    missing = [e.name for e in imported if not sources.has(e)]
    if missing and not allow_missing:
      raise MissingTensorsError(
          f"{len(missing)} tensors missing from {hf_dir} ({layout} layout): {missing[:8]}; "
          "allow_missing=True initialises them (and reports them)")
    for path, group in groups.items():
      sources.check_shapes(path, group, abstract[path].shape, checkpoint_vocab)
    fresh = {p for p in abstract if p not in groups or not all(
        sources.has(e) for _, e in groups[p])}
    params = {path: placement.place(sources.read_leaf(group, abstract[path]), shardings[path],
                                    path)
              for path, group in groups.items() if path not in fresh}
    params.update(placement.init_leaves(cfg, fresh, shardings, seed))
    report = {"missing": missing, "unexpected": sorted(sources.unexpected),
              "initialised": sorted(placement.path_name(p) for p in fresh),
              "added_tokens": added}
  return ImportedModel(model_config=ml_collections.ConfigDict(cfg.to_dict()),
                       params=traverse_util.unflatten_dict(params),
                       tokenizer_dir=tokenizer_dir, report=report, layout=layout)

