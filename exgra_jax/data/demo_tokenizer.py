"""The demo tokenizer: a byte-level BPE with exactly 1024 entries, trained on the demo world.

Why: the tiny model preset has `llm.vocab_size = 1024` and nothing may be downloaded, so
the demo needs its own LLaMA-like tokenizer (merges the text does not supply are filled
with reserved tokens). Byte-level pre-tokenisation covers every
possible character (no `<unk>` in practice) and decodes exactly; the LLaMA specials keep
their ids (`<unk>`=0, `<s>`=1, `</s>`=2), and `<pad>`, `<image>`, `<im_start>`,
`<im_patch>`, `<im_end>` are added special tokens that never split. The chat template's
strings (`###`, role tags, the system line) are part of the training text, so the stop
string `###` is one token. Saved in HF format, loadable with
`transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)`.
"""
from __future__ import annotations

from collections.abc import Sequence

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>", "<im_start>", "<im_patch>",
                  "<im_end>")
SYSTEM_LINE = ("A chat between a curious human and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the human's "
               "questions.")
TEMPLATE_TEXTS = (SYSTEM_LINE, "### Human: ", "### Assistant: ", "###Human: Hi!",
                  "###Assistant: Hi there!  How can I help you today?\n", "###",
                  "Here are 4 candidate answers:",
                  " Only return what you think is the correct answer from the candidate "
                  "answers, do not return any other irrelevant text!")
# How often the template strings count in training: they occur in every example.
TEMPLATE_WEIGHT = 50


def train_demo_tokenizer(texts: Sequence[str], out_dir: str
                         ) -> transformers.PreTrainedTokenizerFast:
  """Trains on `texts` (+ the template strings) and saves to `out_dir`; same input, same bytes."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  # GPT-2 style words (a leading space belongs to the word; punctuation apart), with `###`
  # kept whole: the prompt a model is asked with ("... ### Assistant:") then tokenizes
  # exactly as the same text inside a training conversation, which merges across spaces
  # (": Yes" as one token) would break.
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split("###", behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                min_frequency=1, show_progress=False)
  corpus = sorted(texts) + sorted(TEMPLATE_TEXTS) * TEMPLATE_WEIGHT
  tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
  # The demo text may hold fewer merges than the tiny preset's 1024 rows: reserved tokens
  # (never produced by the text) fill the vocabulary to exactly its size.
  reserved = VOCAB_SIZE - tok.get_vocab_size()
  if reserved < 0:
    raise ValueError(f"demo tokenizer has {tok.get_vocab_size()} entries, over {VOCAB_SIZE}")
  tok.add_special_tokens([f"<reserved_{i}>" for i in range(reserved)])
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
      pad_token="<pad>", additional_special_tokens=list(SPECIAL_TOKENS[4:]),
      clean_up_tokenization_spaces=False, model_max_length=4096, padding_side="right")
  fast.save_pretrained(out_dir)
  return fast
