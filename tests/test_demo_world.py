"""Demo world: determinism, record formats, images, answer consistency, tokenizer."""
import hashlib
import json
import os

import numpy as np
import PIL.Image
import pydicom
import pytest
import transformers

from exgra_jax.data import demo_world as dw
from exgra_jax.data import text

CLOSED_SUFFIX = ' (Answer with either "Yes" or "No").'


def _load(root, rel):
  with open(os.path.join(root, rel), encoding="utf-8") as f:
    return json.load(f)


def _hashes(root):
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      path = os.path.join(d, n)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_same_seed_same_bytes(demo_world, tmp_path):
  dw.make_demo_world(str(tmp_path / "again"), size="small", seed=0)
  first, second = _hashes(demo_world), _hashes(str(tmp_path / "again"))
  assert first.keys() == second.keys()
  assert [k for k in first if first[k] != second[k]] == []


def test_idempotent_and_refuses_foreign_root(demo_world, tmp_path):
  before = os.stat(os.path.join(demo_world, "manifest.json")).st_mtime_ns
  manifest = dw.make_demo_world(demo_world, size="small", seed=0)
  assert os.stat(os.path.join(demo_world, "manifest.json")).st_mtime_ns == before
  assert manifest["size"] == "small" and manifest["seed"] == 0
  with pytest.raises(ValueError, match="not a demo world of size='small' seed=1"):
    dw.make_demo_world(demo_world, size="small", seed=1)
  with pytest.raises(ValueError, match="size 'huge' unknown"):
    dw.make_demo_world(str(tmp_path / "x"), size="huge")
  with pytest.raises(ValueError, match="non-negative int"):
    dw.make_demo_world(str(tmp_path / "x"), size="small", seed=-1)


def test_stage_records_follow_spec(demo_world):
  for rel, long in (("stage1_captions.json", False), ("stage2_instruct_long.json", True)):
    records = _load(demo_world, rel)
    assert len({r["id"] for r in records}) == len(records) > 50
    for r in records:
      assert os.path.exists(os.path.join(demo_world, "images", r["image"]))
      turns = r["conversations"]
      assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
      assert turns[0]["value"].startswith("<image>\n")
      assert sum("<image>" in t["value"] for t in turns) == 1
      if long:
        assert [t["from"] for t in r["conversations_long"]] == [t["from"] for t in turns]
        for short_t, long_t in zip(turns, r["conversations_long"]):
          if short_t["from"] == "human":
            assert long_t["value"] == short_t["value"]
          else:
            assert len(long_t["value"]) > len(short_t["value"])
      else:
        assert len(turns) == 2


def test_every_image_decodes(demo_world):
  attributes = _load(demo_world, "attributes.json")
  modes = set()
  for rel in attributes:
    path = os.path.join(demo_world, rel)
    if rel.endswith(".dcm"):
      assert pydicom.dcmread(path).pixel_array.ndim == 2
      continue
    with PIL.Image.open(path) as image:
      image.load()
      modes.add((image.format, image.mode))
      assert image.size == (dw.IMAGE_PX, dw.IMAGE_PX)
  assert {("PNG", "L"), ("PNG", "I;16"), ("JPEG", "RGB")} <= modes
  assert any(rel.endswith(".dcm") for rel in attributes)


def test_answers_match_attributes(demo_world):
  attributes = _load(demo_world, "attributes.json")
  for r in _load(demo_world, "stage1_captions.json"):
    a = attributes["images/" + r["image"]]
    answer = r["conversations"][1]["value"]
    assert dw.MODALITY_NAME[a["modality"]] in answer
    if "organ" in a:
      assert a["organ"] in answer
      assert (f"{a['count']} {a['size']}" in answer) == a["lesion"]
      assert (f"on the {a['side']} side" in answer) == a["lesion"]
  checked = {"CLOSED": 0, "OPEN": 0}
  candidates = set(_load(demo_world, "vqa/candidate.json"))
  for split in ("train", "val", "test"):
    for item in _load(demo_world, f"vqa/{split}_w_options_new.json"):
      a = attributes["vqa/images/" + item["image"]]
      question, answer = (t["value"] for t in item["conversations"])
      assert question.endswith("\n<image>")
      if item["answer_type"] == "CLOSED":
        assert question.endswith(CLOSED_SUFFIX + "\n<image>")
        if question.startswith("Is there a"):
          assert answer == ("Yes" if a["lesion"] else "No")
        else:
          asked = dw.MODALITY_NAME[a["modality"]] in question
          assert answer == ("Yes" if asked else "No")
      else:
        assert answer in candidates
        expected = {"What imaging modality is this?": a["modality"],
                    "Which organ is shown?": a["organ"]}.get(question[:-len("\n<image>")])
        if expected is None:
          expected = {"How": str(a["count"]), "Which": a["side"], "What": a["size"]}[
              question.split()[0]]
        assert answer == expected
      checked[item["answer_type"]] += 1
  assert checked["CLOSED"] > 50 and checked["OPEN"] > 50
  for item in _load(demo_world, "omnimed/demo_world.json"):
    a = attributes[item["image"]]
    options = [item[f"option_{k}"] for k in "ABCD"]
    assert item["gt_answer"] == dw.MODALITY_NAME[a["modality"]] in options
    assert sorted(options) == sorted(dw.MODALITY_NAME.values())


def test_lesions_are_drawn_on_the_stated_side():
  """A lesion changes pixels only on its side of the image (patient right = image left)."""
  for modality, organ in (("ct", "liver"), ("mri", "brain"), ("xray", "lung")):
    clean = dw.Attributes(modality, organ, False, 0, "none", "none")
    ill = dw.Attributes(modality, organ, True, 2, "large", "right")
    a = dw.DRAWERS[modality](np.random.default_rng(3), clean)
    b = dw.DRAWERS[modality](np.random.default_rng(3), ill)
    scale = 257 if a.dtype == np.uint16 else 1  # 16-bit MR holds 8-bit levels x 257
    # Pixel noise (sigma <= 8 grey levels) differs between the two; lesions differ by > 40.
    diff = np.abs(a.astype(np.int64) - b.astype(np.int64)) > 40 * scale
    half = dw.IMAGE_PX // 2
    assert diff[:, :half].sum() > 20 * diff[:, half:].sum() + 10, modality


def test_tokenizer(demo_world):
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(demo_world, "tokenizer"),
                                                   local_files_only=True)
  text.check_tokenizer(tok)
  assert len(tok) == 1024
  ids = tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>", "<image>", "<im_start>",
                                   "<im_patch>", "<im_end>"])
  assert ids[:3] == [0, 1, 2] and len(set(ids)) == 8 and max(ids) < 1024
  assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
  assert tok.pad_token_id == ids[3]
  assert len(tok("###", add_special_tokens=False).input_ids) == 1
  specials = "<image><im_start><im_patch><im_patch><im_end>"
  assert tok("x" + specials + "y", add_special_tokens=False).input_ids[1:6] == [
      ids[4], ids[5], ids[6], ids[6], ids[7]]
  samples = [t["value"] for r in _load(demo_world, "stage2_instruct_long.json")[:20]
             for t in r["conversations_long"]]
  samples += ["Unseen text: naïve café, 3.5 mm, Zürich ✓", specials + "\n###"]
  for sample in samples:
    assert tok.decode(tok(sample, add_special_tokens=False).input_ids) == sample
  assert tok("hi").input_ids[0] == 1


def test_every_vqa_question_has_its_kind():
  """vqa_question_kind tells apart every template vqa_questions draws (all 7 occur)."""
  rng = np.random.default_rng(0)
  seen = {}
  for _ in range(200):
    for answer_type, question, _ in dw.vqa_questions(dw.draw_attributes(rng), rng):
      seen.setdefault(dw.vqa_question_kind(question), set()).add(answer_type)
  assert set(seen) == set(dw.VQA_QUESTION_KINDS)
  assert seen["lesion present?"] == seen["is this a <modality>?"] == {"CLOSED"}
  assert all(seen[k] == {"OPEN"} for k in ("modality", "organ", "count", "size", "side"))
  assert dw.vqa_question_kind("Is there a nodule in the lung?") == "lesion present?"
  assert dw.vqa_question_kind("How many tumor nests are there?") == "count"
  with pytest.raises(ValueError, match="not a demo-world VQA question"):
    dw.vqa_question_kind("What is the diagnosis?")
