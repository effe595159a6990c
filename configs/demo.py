"""The embedded default: the whole recipe on the generated demo world with the tiny model.

    --config=configs/demo.py          the demo: medium world, a model that learns (< 10 min)
    --config=configs/demo.py:small    the machinery check the tests run (~1 min)

Both run vision pre-training (medium only) -> stage 1 (projector) -> stage 2 (instruction
tuning + multi-graph alignment) -> VQA fine-tune -> evaluation -> HF export on CPU, from
random weights. The demo world is made in `data.root` (default: ./.cache/demo_<size>
under the current directory) if missing.

medium: 2400 image/caption pairs and 2403 VQA training items are enough for the tiny
model to learn what the images show, once its tower has features worth reading: no
pretrained CLIP exists offline, so a CLIP-style contrastive pre-training of the tower on
the stage-1 pairs comes first (train/vision_pretrain.py); the tower is then frozen in
every stage, as the release freezes it. Stage 1 and stage 2 run half an epoch each, the
fine-tune four: the yes/no questions are learned last (docs/demo_world.md: the measured
scores per question type and epoch).
small: 120 images, a few steps per stage; it shows that the machinery runs, and it
answers at chance. experiments/data_efficiency/run.py starts from the medium profile.
"""
from configs import base


def get_config(arg=None):
  size = arg or "medium"
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
  if size == "medium":
    c.vision_pretrain.steps = 400
    c.vision_pretrain.lr = 3e-3
    # Padded lengths just above the longest sample of each stage (stage 1 and the VQA
    # items <= 135 tokens with the 66 image tokens, stage 2 <= 191): 1.7x faster steps
    # than padding to 256.
    c.data.length_buckets = (144, 192, 512)
    c.stage1.epochs = 0.5
    c.stage2.epochs = 0.5
    c.finetune.epochs = 4.0
    c.train.log_every = 25
    c.train.image_every = 25
    c.train.checkpoint_every = 100
  return c
