"""VQA evaluation of a loaded tiny model: answers, metrics, protocol report, resume, refusal."""
import json

import jax
import numpy as np
import PIL.Image
import pytest
import tokenizers
import transformers

from exgra_jax.data import images
from exgra_jax.eval import vqa, vqa_metrics, zero_shot
from exgra_jax.inference import generate, prompts, single_question
from exgra_jax.models.config import LlavaConfig, LlmConfig, VisionConfig
from exgra_jax.models.llava import LlavaModel
from exgra_jax.weights import loading

CFG = LlavaConfig(
    vision=VisionConfig(image_size=28, patch_size=7, hidden_size=32, num_layers=1, num_heads=4,
                        intermediate_size=64),
    llm=LlmConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=128),
    connector="none", projector="mlp2x_gelu")
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<im_start>", "<im_patch>", "<im_end>"]
WORDS = ["yes", "no", "left", "lung", "is", "there", "a", "mass", "where", "###", "Human",
         "Assistant", ":", "?", "."]


def _tokenizer():
  vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
  core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  core.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", 1)])
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                             bos_token="<s>", eos_token="</s>",
                                             pad_token="<pad>")
  tok.add_special_tokens({"additional_special_tokens": SPECIAL[4:]})
  return tok


def _items():
  return [{"id": i, "image": f"{i}.png", "answer_type": kind,
           "conversations": [{"from": "human", "value": f"{q}\n<image>"},
                             {"from": "gpt", "value": a}]}
          for i, (kind, q, a) in enumerate([("CLOSED", "is there a mass ?", "yes"),
                                            ("OPEN", "where is the mass ?", "left lung"),
                                            ("CLOSED", "is there a lung ?", "no")])]


@pytest.fixture(scope="module")
def loaded():
  model = LlavaModel(CFG)
  ids = np.zeros((1, 20), np.int32)
  ids[0, 2:18] = 5
  params = model.init(jax.random.key(0), ids, np.ones_like(ids), ids == 5,
                      np.zeros((1, 28, 28, 3), np.float32))["params"]
  return model, params, _tokenizer()


def _run(loaded, tmp_path, load_pixels, load_report=None):
  model, params, tok = loaded
  gt = tmp_path / "test.json"
  gt.write_text(json.dumps(_items()))
  (tmp_path / "ckpt").mkdir(exist_ok=True)
  (tmp_path / "ckpt" / "params").write_bytes(b"p")
  settings = generate.GenerationSettings(batch_size=2, length_buckets=(64, 128),
                                         max_new_tokens=4)
  inputs = vqa.VqaInputs(items=_items(), data_files={"test": str(gt)},
                         candidates=["yes", "no", "left lung"])
  return vqa.evaluate_loaded(
      model, params, tok, inputs, load_pixels, settings=settings, template="simple",
      num_image_tokens=16, output_dir=str(tmp_path / "out"), model_id="tiny",
      checkpoint=str(tmp_path / "ckpt"), load_report=load_report or {"missing": []})


def test_evaluate_writes_answers_metrics_report_and_resumes(loaded, tmp_path):
  rng = np.random.RandomState(0)
  pixels = lambda item: rng.randn(28, 28, 3).astype(np.float32)
  metrics = _run(loaded, tmp_path, pixels)
  out = tmp_path / "out"
  rescored = vqa_metrics.evaluate_files(str(tmp_path / "test.json"), str(out / "answers.jsonl"))
  assert metrics["CLOSED"]["count"] == 2 and metrics["OPEN"]["count"] == 1
  assert metrics["closed_accuracy"] == rescored["closed_accuracy"]
  assert metrics["OPEN"]["recall"] == rescored["OPEN"]["recall"]
  assert "candidate_hit" in metrics["OPEN"]
  protocol = json.loads((out / "protocol.json").read_text())
  assert protocol["split_sizes"] == {"OPEN": 1, "CLOSED": 2, "overall": 3}
  assert protocol["decoding"]["max_new_tokens"] == 4 and protocol["decoding"]["greedy"]
  assert "{question}" in protocol["template"] and "<im_patch>" in protocol["template"]
  lines = [json.loads(l) for l in (out / "answers.jsonl").read_text().splitlines()]
  assert [l["question_id"] for l in lines] == ["0", "1", "2"]
  assert lines[0]["prompt"].endswith("<im_end>###")

  def no_more_images(item):
    raise AssertionError("a resumed run must not answer again")
  assert _run(loaded, tmp_path, no_more_images) == metrics


def test_evaluate_refuses_incomplete_weights_before_generating(loaded, tmp_path):
  def never(item):
    raise AssertionError("must not generate")
  with pytest.raises(loading.IncompleteWeights):
    _run(loaded, tmp_path, never, {"missing": ["vision/patch_embed"]})
  assert not (tmp_path / "out").exists()


def test_answer_question_from_an_image_file_equals_generate(loaded, tmp_path):
  model, params, tok = loaded
  rgb = np.random.RandomState(2).randint(0, 256, (40, 30, 3), np.uint8)
  PIL.Image.fromarray(rgb).save(tmp_path / "x.png")
  answer = single_question.answer_question(model, params, tok, str(tmp_path / "x.png"),
                                           "is there a mass ?", template="simple",
                                           max_new_tokens=4)
  prompt = prompts.build_prompt("is there a mass ?\n<image>", "simple", 16)
  ids = tok(prompt).input_ids
  pixels = images.clip_preprocess(rgb, 28)[None]
  settings = generate.GenerationSettings(batch_size=1, length_buckets=(128,), max_new_tokens=4)
  expected = generate.generate(model, params, [ids], pixels, settings, image_patch_id=5,
                               eos_id=2, pad_id=3, detokenize=lambda t: tok.decode(
                                   t, skip_special_tokens=True))
  assert answer == expected[0]
  with pytest.raises(images.ImageDecodeError):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    single_question.answer_question(model, params, tok, str(tmp_path / "bad.png"), "q",
                                    template="none", max_new_tokens=1)


def test_zero_shot_evaluation_with_a_loaded_model(loaded, tmp_path):
  model, params, tok = loaded
  items = [{"question_id": f"q{i}", "question": "where is the mass ?", "dataset": d,
            "options": ["left lung", "yes"], "gt_answer": "left lung"}
           for i, d in enumerate(["A", "A", "B"])]
  settings = generate.GenerationSettings(batch_size=2, length_buckets=(128,), max_new_tokens=3)
  result = zero_shot.evaluate_loaded(
      model, params, tok, items, lambda item: np.zeros((28, 28, 3), np.float32),
      settings=settings, template="simple", num_image_tokens=16,
      output_dir=str(tmp_path), model_id="tiny")
  lines = [json.loads(l) for l in (tmp_path / "answers.jsonl").read_text().splitlines()]
  assert "Here are 2 candidate answers:\nleft lung\nyes\n" in lines[0]["prompt"]
  expected = zero_shot.accuracy_per_dataset(items, {l["question_id"]: l["text"] for l in lines})
  assert result == expected == json.loads((tmp_path / "zero_shot_accuracy.json").read_text())
  assert result["A"]["count"] == 2 and result["overall"]["count"] == 3
