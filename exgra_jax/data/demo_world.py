"""The demo world: a deterministic, procedurally drawn medical-looking multimodal dataset.

Why: a new user must see the whole recipe (stage 1 -> stage 2 with the multi-graph loss
-> VQA fine-tune -> evaluation -> export) run on a laptop CPU without downloading
anything, and the data-efficiency experiment needs data with learnable signal. Every
image is drawn from a small set of attributes (modality, organ, lesion presence, count,
size, side) and every text (captions, instructions, extended captions, VQA answers,
multiple-choice items) is a function of those attributes only, so a model can learn the
mapping and tests can check each answer against `attributes.json`.

Layout written under `root` (the formats of docs/data.md):
  images/*.{png,jpg,dcm}           stage-1/2 images (RGB PNG, 8- and 16-bit grey PNG,
                                   JPEG, and pydicom's CT_small/MR_small DICOM files)
  stage1_captions.json             one caption request, one caption per record
  stage2_instruct_long.json        multi-turn Q&A + `conversations_long`
  vqa/{train,val,test}_w_options_new.json, vqa/candidate.json, vqa/images/
  omnimed/demo_world.json          OmniMedVQA-style multiple choice (options A-D)
  attributes.json                  the drawn attributes of every image
  tokenizer/                       the demo tokenizer (data/demo_tokenizer.py)
  manifest.json                    size, seed, version, counts, file list (written last)
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pydicom.data
from absl import logging

from exgra_jax import temp_paths
from exgra_jax.data import demo_tokenizer

VERSION = 3  # 2: GPT-2 style word splitting in the demo tokenizer; 3: both modality checks
SIZES = {"small": dict(images=120, vqa_images=60), "medium": dict(images=2400, vqa_images=600)}
IMAGE_PX = 128
MODALITIES = ("ct", "mri", "xray", "histology")
ORGANS = {"ct": ("liver", "kidney"), "mri": ("brain",), "xray": ("lung",),
          "histology": ("tissue",)}
MODALITY_NAME = {"ct": "CT scan", "mri": "MRI scan", "xray": "chest X-ray",
                 "histology": "histology slide"}
MODALITY_LONG = {
    "ct": "an axial computed tomography slice of the abdomen",
    "mri": "an axial magnetic resonance image of the head",
    "xray": "a frontal chest radiograph",
    "histology": "a hematoxylin and eosin stained histology section",
}
LESION_WORD = {"ct": "lesion", "mri": "lesion", "xray": "nodule", "histology": "tumor nest"}
CAPTION_REQUESTS = ("Describe the image concisely.", "Give a short caption of this image.",
                    "What does this image show?", "Summarize the visual content briefly.")
CLOSED_SUFFIX = ' (Answer with either "Yes" or "No").'
DICOM_FILES = (("CT_small.dcm", "ct"), ("MR_small.dcm", "mri"))


@dataclasses.dataclass(frozen=True)
class Attributes:
  """What an image shows; all text about the image derives from these fields."""
  modality: str
  organ: str
  lesion: bool
  count: int        # 0 when no lesion
  size: str         # "small" | "large" | "none"
  side: str         # "left" | "right" | "none"


def draw_attributes(rng: np.random.Generator) -> Attributes:
  modality = MODALITIES[rng.integers(len(MODALITIES))]
  organs = ORGANS[modality]
  organ = organs[rng.integers(len(organs))]
  lesion = bool(rng.random() < 0.55)
  if not lesion:
    return Attributes(modality, organ, False, 0, "none", "none")
  return Attributes(modality, organ, True, int(rng.integers(1, 4)),
                    ("small", "large")[rng.integers(2)], ("left", "right")[rng.integers(2)])


# ---------------------------------------------------------------- drawing
def _lesion_centres(rng, attrs: Attributes, box: tuple[float, float, float, float]):
  """Lesion centres inside `box` (x0, y0, x1, y1), restricted to the image side.

  Radiological convention: the patient's right is on the image's left.
  """
  x0, y0, x1, y1 = box
  mid = (x0 + x1) / 2
  lo, hi = (mid, x1) if attrs.side == "left" else (x0, mid)
  radius = IMAGE_PX * (0.06 if attrs.size == "large" else 0.025)
  centres = []
  for i in range(attrs.count):
    ys = y0 + (y1 - y0) * (i + 0.5) / attrs.count
    xs = rng.uniform(lo + radius, max(lo + radius + 1, hi - radius))
    centres.append((xs, ys))
  return centres, radius


def _ellipse(draw, cx, cy, rx, ry, fill):
  draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)


def _texture(rng, image: PIL.Image.Image, sigma: float) -> np.ndarray:
  pixels = np.asarray(image, dtype=np.float32)
  pixels = pixels + rng.normal(0.0, sigma, pixels.shape).astype(np.float32)
  return np.clip(pixels, 0, 255)


def draw_ct(rng, attrs: Attributes) -> np.ndarray:
  """Grey axial abdomen: body ellipse, liver (patient's right), kidneys, spine. [H, W] uint8."""
  s = IMAGE_PX
  image = PIL.Image.new("L", (s, s), 5)
  d = PIL.ImageDraw.Draw(image)
  _ellipse(d, s / 2, s / 2, s * 0.45, s * 0.36, 90)
  _ellipse(d, s * 0.33, s * 0.45, s * 0.16, s * 0.18, 130)   # liver
  _ellipse(d, s * 0.65, s * 0.42, s * 0.08, s * 0.06, 110)   # spleen/stomach
  _ellipse(d, s * 0.37, s * 0.66, s * 0.06, s * 0.08, 150)   # kidneys
  _ellipse(d, s * 0.63, s * 0.66, s * 0.06, s * 0.08, 150)
  _ellipse(d, s * 0.5, s * 0.72, s * 0.05, s * 0.05, 240)    # spine
  if attrs.lesion:
    box = ((s * 0.18, s * 0.3, s * 0.82, s * 0.6) if attrs.organ == "liver"
           else (s * 0.3, s * 0.6, s * 0.7, s * 0.72))
    centres, r = _lesion_centres(rng, attrs, box)
    for cx, cy in centres:
      _ellipse(d, cx, cy, r, r, 60)
  return _texture(rng, image, 6.0).astype(np.uint8)


def draw_mri(rng, attrs: Attributes) -> np.ndarray:
  """Axial brain: skull ring, grey and white matter, ventricles. [H, W] uint16 (16-bit MR)."""
  s = IMAGE_PX
  image = PIL.Image.new("L", (s, s), 0)
  d = PIL.ImageDraw.Draw(image)
  _ellipse(d, s / 2, s / 2, s * 0.42, s * 0.47, 200)   # skull/scalp
  _ellipse(d, s / 2, s / 2, s * 0.38, s * 0.43, 30)
  _ellipse(d, s / 2, s / 2, s * 0.36, s * 0.41, 120)   # grey matter
  _ellipse(d, s / 2, s / 2, s * 0.28, s * 0.33, 170)   # white matter
  _ellipse(d, s * 0.45, s / 2, s * 0.04, s * 0.12, 25)  # ventricles
  _ellipse(d, s * 0.55, s / 2, s * 0.04, s * 0.12, 25)
  if attrs.lesion:
    centres, r = _lesion_centres(rng, attrs, (s * 0.2, s * 0.22, s * 0.8, s * 0.78))
    for cx, cy in centres:
      _ellipse(d, cx, cy, r, r, 250)
  return (_texture(rng, image, 5.0) * 257.0).astype(np.uint16)


def draw_xray(rng, attrs: Attributes) -> np.ndarray:
  """Frontal chest: dark lungs, ribs, heart shadow. [H, W] uint8."""
  s = IMAGE_PX
  image = PIL.Image.new("L", (s, s), 170)
  d = PIL.ImageDraw.Draw(image)
  _ellipse(d, s * 0.32, s * 0.5, s * 0.15, s * 0.3, 50)
  _ellipse(d, s * 0.68, s * 0.5, s * 0.15, s * 0.3, 50)
  for k in range(7):
    y = s * (0.26 + 0.075 * k)
    d.arc((s * 0.12, y - s * 0.05, s * 0.88, y + s * 0.05), 180, 360, fill=120, width=2)
  _ellipse(d, s * 0.56, s * 0.62, s * 0.12, s * 0.12, 160)   # heart shadow
  if attrs.lesion:
    centres, r = _lesion_centres(rng, attrs, (s * 0.18, s * 0.25, s * 0.82, s * 0.72))
    for cx, cy in centres:
      _ellipse(d, cx, cy, r, r, 215)
  return _texture(rng, image, 8.0).astype(np.uint8)


def draw_histology(rng, attrs: Attributes) -> np.ndarray:
  """H&E-like field: pink stroma, purple nuclei; tumor nests are dense dark clusters. [H, W, 3]."""
  s = IMAGE_PX
  image = PIL.Image.new("RGB", (s, s), (236, 180, 205))
  d = PIL.ImageDraw.Draw(image)
  for _ in range(90):
    cx, cy = rng.uniform(0, s, 2)
    r = rng.uniform(2.0, 3.5)
    _ellipse(d, cx, cy, r, r * 0.8, (120, 70, 160))
  if attrs.lesion:
    centres, r = _lesion_centres(rng, attrs, (s * 0.1, s * 0.15, s * 0.9, s * 0.85))
    for cx, cy in centres:
      _ellipse(d, cx, cy, r * 1.3, r * 1.3, (180, 120, 190))
      for _ in range(int(12 * (r / 3))):
        nx, ny = cx + rng.uniform(-r, r), cy + rng.uniform(-r, r)
        _ellipse(d, nx, ny, 2.0, 2.0, (60, 20, 100))
  return _texture(rng, image, 6.0).astype(np.uint8)


DRAWERS = {"ct": draw_ct, "mri": draw_mri, "xray": draw_xray, "histology": draw_histology}
EXTENSIONS = {"ct": ".png", "mri": ".png", "xray": ".png", "histology": ".jpg"}


def encode_image(pixels: np.ndarray, modality: str) -> bytes:
  """PNG (8-bit grey, 16-bit grey) or JPEG bytes; fixed encoder settings for determinism."""
  buffer = io.BytesIO()
  if modality == "histology":
    PIL.Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
  elif pixels.dtype == np.uint16:
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
  else:
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


# ---------------------------------------------------------------- text
def lesion_phrase(a: Attributes) -> str:
  word = LESION_WORD[a.modality]
  plural = word + ("s" if a.count > 1 else "")
  return f"{a.count} {a.size} {plural}"


def caption(a: Attributes) -> str:
  base = f"{MODALITY_NAME[a.modality]} of the {a.organ}"
  if not a.lesion:
    return f"{base} with no {LESION_WORD[a.modality]}."
  return f"{base} showing {lesion_phrase(a)} on the {a.side} side."


def instruction_turns(a: Attributes) -> list[tuple[str, str, str]]:
  """(question, short answer, extended answer) triples about one image."""
  word = LESION_WORD[a.modality]
  turns = [
      ("What imaging modality is shown?", f"This is a {MODALITY_NAME[a.modality]}.",
       f"This is a {MODALITY_NAME[a.modality]}, that is {MODALITY_LONG[a.modality]}."),
      ("Which organ is the focus of this image?", f"The {a.organ}.",
       f"The image is centred on the {a.organ}, which is the main structure to assess "
       f"in this {MODALITY_NAME[a.modality]}."),
  ]
  if a.lesion:
    turns.append((f"Is there any {word} visible?", f"Yes, there are {lesion_phrase(a)}."
                  if a.count > 1 else f"Yes, there is {lesion_phrase(a)}.",
                  f"Yes. The {a.organ} contains {lesion_phrase(a)}, clearly distinct from "
                  f"the surrounding normal {a.organ}."))
    turns.append((f"On which side is the {word}?", f"On the {a.side} side.",
                  f"The abnormality lies on the {a.side} side of the patient, while the "
                  f"other side looks normal."))
  else:
    turns.append((f"Is there any {word} visible?", "No, the image looks normal.",
                  f"No. The {a.organ} appears normal, with no {word} or other focal "
                  f"abnormality."))
  return turns


def vqa_questions(a: Attributes, rng) -> list[tuple[str, str, str]]:
  """(answer_type, question, answer) for one VQA image; answers are short and exact."""
  word = LESION_WORD[a.modality]
  other = MODALITIES[(MODALITIES.index(a.modality) + 1 + rng.integers(3)) % 4]
  # Both modality checks of every image: the answer depends on the image alone (one question
  # drawn at random let a model lean on which modality names are asked how often), and
  # each image gives the comparison a "Yes" and a "No" example.
  items = [
      ("CLOSED", f"Is there a {word} in the {a.organ}?", "Yes" if a.lesion else "No"),
      ("CLOSED", f"Is this a {MODALITY_NAME[a.modality]}?", "Yes"),
      ("CLOSED", f"Is this a {MODALITY_NAME[other]}?", "No"),
      ("OPEN", "What imaging modality is this?", a.modality),
      ("OPEN", "Which organ is shown?", a.organ),
  ]
  if a.lesion:
    items += [("OPEN", f"How many {word}s are there?", str(a.count)),
              ("OPEN", f"Which side is the {word} on?", a.side),
              ("OPEN", f"What is the size of the {word}?", a.size)]
  return items


# The kinds of question `vqa_questions` asks, in the order reports list them, each with the
# start that tells it apart (kept next to the templates above; tested against them).
VQA_QUESTION_KINDS = {"lesion present?": "Is there a ", "is this a <modality>?": "Is this a ",
                      "modality": "What imaging modality", "organ": "Which organ",
                      "count": "How many", "size": "What is the size", "side": "Which side"}


def vqa_question_kind(question: str) -> str:
  """The kind (a VQA_QUESTION_KINDS key) of a question `vqa_questions` wrote, e.g. for
  scores per kind; ValueError for any other question."""
  for kind, start in VQA_QUESTION_KINDS.items():
    if question.startswith(start):
      return kind
  raise ValueError(f"not a demo-world VQA question: {question!r}")


def vqa_item(item_id: str, image: str, answer_type: str, question: str, answer: str):
  suffix = CLOSED_SUFFIX if answer_type == "CLOSED" else ""
  return {"id": item_id, "image": image, "answer_type": answer_type,
          "conversations": [{"from": "human", "value": f"{question}{suffix}\n<image>"},
                            {"from": "gpt", "value": answer}]}


def omnimed_item(item_id: str, image: str, a: Attributes, rng) -> dict[str, Any]:
  order = rng.permutation(len(MODALITIES))
  options = [MODALITY_NAME[MODALITIES[i]] for i in order]
  item = {"question_id": item_id, "image": image, "question": "What imaging modality is this?",
          "gt_answer": MODALITY_NAME[a.modality], "modality": a.modality,
          "dataset": "demo_world"}
  for letter, option in zip("ABCD", options):
    item[f"option_{letter}"] = option
  return item


def _conversation(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
  turns = []
  for i, (question, answer) in enumerate(pairs):
    turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
    turns.append({"from": "gpt", "value": answer})
  return turns


# ---------------------------------------------------------------- building
def _write_json(path: str, obj) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True, ensure_ascii=False)
    f.write("\n")


def _build(out: str, size: str, seed: int) -> dict[str, Any]:
  counts = SIZES[size]
  os.makedirs(os.path.join(out, "images"))
  os.makedirs(os.path.join(out, "vqa", "images"))
  os.makedirs(os.path.join(out, "omnimed"))
  attributes: dict[str, dict[str, Any]] = {}
  stage1, stage2 = [], []
  for index in range(counts["images"]):
    rng = np.random.default_rng([seed, 1, index])
    a = draw_attributes(rng)
    name = f"demo_{index:05d}{EXTENSIONS[a.modality]}"
    with open(os.path.join(out, "images", name), "wb") as f:
      f.write(encode_image(DRAWERS[a.modality](rng, a), a.modality))
    attributes[f"images/{name}"] = dataclasses.asdict(a)
    request = CAPTION_REQUESTS[rng.integers(len(CAPTION_REQUESTS))]
    stage1.append({"id": f"cap_{index:05d}", "image": name,
                   "conversations": _conversation([(request, caption(a))])})
    turns = instruction_turns(a)
    stage2.append({"id": f"inst_{index:05d}", "image": name,
                   "conversations": _conversation([(q, s) for q, s, _ in turns]),
                   "conversations_long": _conversation([(q, l) for q, _, l in turns])})
  for dicom_name, modality in DICOM_FILES:
    shutil.copyfile(pydicom.data.get_testdata_file(dicom_name),
                    os.path.join(out, "images", dicom_name))
    stage1.append({"id": f"cap_{dicom_name}", "image": dicom_name, "conversations":
                   _conversation([(CAPTION_REQUESTS[0],
                                   f"{MODALITY_NAME[modality]} stored as a DICOM file.")])})
    attributes[f"images/{dicom_name}"] = {"modality": modality, "source": "pydicom"}

  splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
  omnimed, open_answers = [], set()
  for index in range(counts["vqa_images"]):
    rng = np.random.default_rng([seed, 2, index])
    a = draw_attributes(rng)
    name = f"vqa_{index:05d}{EXTENSIONS[a.modality]}"
    with open(os.path.join(out, "vqa", "images", name), "wb") as f:
      f.write(encode_image(DRAWERS[a.modality](rng, a), a.modality))
    attributes[f"vqa/images/{name}"] = dataclasses.asdict(a)
    split = "train" if index % 10 < 7 else ("val" if index % 10 == 7 else "test")
    for k, (answer_type, question, answer) in enumerate(vqa_questions(a, rng)):
      splits[split].append(vqa_item(f"vqa_{index:05d}_{k}", name, answer_type, question,
                                    answer))
      if answer_type == "OPEN":
        open_answers.add(answer)
    omnimed.append(omnimed_item(f"omni_{index:05d}", f"vqa/images/{name}", a, rng))

  _write_json(os.path.join(out, "stage1_captions.json"), stage1)
  _write_json(os.path.join(out, "stage2_instruct_long.json"), stage2)
  for split, items in splits.items():
    _write_json(os.path.join(out, "vqa", f"{split}_w_options_new.json"), items)
  _write_json(os.path.join(out, "vqa", "candidate.json"), sorted(open_answers))
  _write_json(os.path.join(out, "omnimed", "demo_world.json"), omnimed)
  _write_json(os.path.join(out, "attributes.json"), attributes)
  demo_tokenizer.train_demo_tokenizer(corpus_texts(out), os.path.join(out, "tokenizer"))
  return {"version": VERSION, "size": size, "seed": seed,
          "counts": {"stage1": len(stage1), "stage2": len(stage2),
                     **{f"vqa_{k}": len(v) for k, v in splits.items()},
                     "omnimed": len(omnimed)}}


def corpus_texts(root: str) -> list[str]:
  """Every text of the world (records and the chat templates), sorted, for the tokenizer."""
  texts = set()
  for rel in ("stage1_captions.json", "stage2_instruct_long.json",
              "vqa/train_w_options_new.json", "vqa/val_w_options_new.json",
              "vqa/test_w_options_new.json"):
    with open(os.path.join(root, rel), encoding="utf-8") as f:
      for record in json.load(f):
        for key in ("conversations", "conversations_long"):
          texts.update(turn["value"] for turn in record.get(key, ()))
  with open(os.path.join(root, "omnimed", "demo_world.json"), encoding="utf-8") as f:
    for item in json.load(f):
      texts.update(str(v) for k, v in item.items() if k.startswith(("question", "option_")))
  return sorted(texts)


def _complete(root: str, size: str, seed: int) -> dict[str, Any] | None:
  path = os.path.join(root, "manifest.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    manifest = json.load(f)
  if (manifest.get("version"), manifest.get("size"), manifest.get("seed")) != (VERSION, size,
                                                                              seed):
    return None
  return manifest


def make_demo_world(root: str, size: str = "small", seed: int = 0) -> dict[str, Any]:
  """Builds (or finds) the demo world in `root`; returns its manifest.

  Idempotent: a complete world of the same size, seed and version is returned as is.
  Atomic: the world is built in a sibling temp dir and renamed into place, so a crash
  never leaves a half-written world that looks complete (manifest.json is written last);
  the temp dir a killed build left is removed by the next build (`temp_paths`).
  A `root` holding something else (another size/seed/version) is an error, not overwritten.
  """
  if size not in SIZES:
    raise ValueError(f"demo world size {size!r} unknown: expected one of {sorted(SIZES)}")
  if not isinstance(seed, int) or seed < 0:
    raise ValueError(f"demo world seed must be a non-negative int, got {seed!r}")
  root = os.path.abspath(root)
  found = _complete(root, size, seed)
  if found is not None:
    return found
  if os.path.exists(root) and os.listdir(root):
    raise ValueError(f"{root} exists and is not a demo world of size={size!r} seed={seed} "
                     f"version={VERSION}: remove it or choose another data.root")
  parent = os.path.dirname(root)
  for path in temp_paths.remove_stale(parent):
    logging.info("removed %s, left by a killed demo-world build", path)
  tmp = temp_paths.new_dir(parent, os.path.basename(root))
  try:
    manifest = _build(tmp, size, seed)
    files = sorted(os.path.relpath(os.path.join(d, n), tmp)
                   for d, _, names in os.walk(tmp) for n in names)
    manifest["files"] = files
    _write_json(os.path.join(tmp, "manifest.json"), manifest)
    if os.path.exists(root):
      os.rmdir(root)
    os.rename(tmp, root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest
