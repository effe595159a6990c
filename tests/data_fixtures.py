"""Small fixtures for the data tests: HF tokenizers and a tiny image world.

`make_tokenizer` is word level (whitespace + punctuation split), so that hand-worked label
masks can be written token by token; `sentencepiece_tokenizer` is LLaMA-shaped (BPE pieces
that split words, Metaspace decoding).
"""
import io
import json
import pathlib

import numpy as np
import PIL.Image
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers, processors

from exgra_jax.data import text

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>",
           "<image>", "<im_start>", "<im_patch>", "<im_end>"]
WORDS = ("A The Human Assistant a chat between curious human and an artificial intelligence assistant the gives "
         "helpful detailed polite answers to s questions human assistant what is this "
         "image it shows lung ct scan mri brain x ray of chest yes no left right normal "
         "abnormal tumor large small findings").split()


def make_tokenizer(directory: pathlib.Path) -> pathlib.Path:
  vocab = {t: i for i, t in enumerate(SPECIAL)}
  for w in WORDS + ["#", ":", ".", "'", ",", "?", "\n", "###"]:
    vocab.setdefault(w, len(vocab))
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
  tok.add_special_tokens(SPECIAL)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
      pad_token="<pad>", additional_special_tokens=SPECIAL[4:])
  fast.save_pretrained(directory)
  return directory


def sentencepiece_tokenizer(directory: pathlib.Path) -> transformers.PreTrainedTokenizerFast:
  """A LLaMA-shaped tokenizer (sentencepiece BPE, Metaspace, BOS) with the image tokens
  added the way `hf/importer` adds them."""
  corpus = [text.SYSTEM, "### Human: what is this?", "### Assistant: a lung, left side",
            "the scan shows an opacity in the right lower lobe"] * 20
  sp = tokenizers.SentencePieceBPETokenizer()
  sp.train_from_iterator(corpus, vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"])
  sp.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", sp.token_to_id("<s>"))])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>",
                                              bos_token="<s>", eos_token="</s>")
  fast.add_special_tokens({"pad_token": "<pad>"})
  fast.add_tokens([text.IM_START, text.IM_PATCH, text.IM_END, "<image>"], special_tokens=True)
  fast.save_pretrained(directory)
  return text.load_tokenizer(directory)


def png_bytes(array: np.ndarray, **kwargs) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(array, **kwargs).save(buf, format="PNG")
  return buf.getvalue()


def record(i: int, image: str | None = None, answer: str = "it shows a lung") -> dict:
  return {"id": f"r{i}", "image": image or f"img{i}.png",
          "conversations": [{"from": "human", "value": "what is this image ?\n<image>"},
                            {"from": "gpt", "value": answer}],
          "conversations_long": [{"from": "human", "value": "what is this image ?\n<image>"},
                                 {"from": "gpt", "value": answer + " of the chest"}]}


def make_world(root: pathlib.Path, n: int, size: int = 40) -> pathlib.Path:
  """n records with distinct random PNGs under root/images; returns the JSON path."""
  (root / "images").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    h, w = size + (i % 3) * 7, size + (i % 5) * 3
    (root / "images" / f"img{i}.png").write_bytes(
        png_bytes(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
  path = root / "records.json"
  path.write_text(json.dumps([record(i) for i in range(n)]))
  return path
