"""The embedded default: the whole recipe on the generated demo world with the tiny model.

stage 1 (projector) -> stage 2 (instruction tuning + multi-graph alignment) -> VQA
fine-tune -> evaluation -> HF export, on CPU in a few minutes. The demo world is made
in `data.root` (default: ./.cache/demo_small under the current directory) if missing.
`--config=configs/demo.py:medium` uses the medium world (data-efficiency experiment).
"""
from configs import base


def get_config(arg=None):
  size = arg or "small"
  c = base.get_config("tiny")
  c.stages = ("stage1", "stage2", "finetune")
  c.init.random = True
  c.data.demo_world = size
  c.data.root = f".cache/demo_{size}"
  c.data.tokenizer_dir = "tokenizer"   # written by the demo world
  c.data.max_length = 512
  c.data.length_buckets = (256, 512)
  c.data.text_max_length = 128
  c.data.workers = 0
  c.stage1.records = "stage1_captions.json"
  c.stage1.global_batch = 16
  c.stage1.lr = 2e-3
  c.stage1.epochs = 1.0
  c.stage2.records = "stage2_instruct_long.json"
  c.stage2.global_batch = 16
  c.stage2.lr = 1e-3
  c.stage2.epochs = 2.0
  c.finetune.records = "vqa/train_w_options_new.json"
  c.finetune.val_records = "vqa/val_w_options_new.json"
  c.finetune.test_records = "vqa/test_w_options_new.json"
  c.finetune.candidates = "vqa/candidate.json"
  c.finetune.image_root = "vqa/images"
  c.finetune.global_batch = 16
  c.finetune.lr = 1e-3
  c.finetune.epochs = 3.0
  c.align.group_size = 8
  c.align.grouping = "fixed"
  c.train.log_every = 5
  c.train.image_every = 5
  c.train.checkpoint_every = 50
  c.train.async_checkpoint = False
  c.eval.max_new_tokens = 16
  # The tiny model knows no chat but the one it was trained on: ask in the training
  # template (the release's "simple" one is for LLaMA-based models).
  c.eval.template = "train"
  c.eval.batch_size = 16
  c.export.after_training = True
  return c
