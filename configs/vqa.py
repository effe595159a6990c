"""VQA fine-tuning from a stage-2 checkpoint (shared by vqa_rad.py, slake.py, pathvqa.py).

`data.root` holds the release's `{train,val,test}_w_options_new.json`, `candidate.json`
(where the set has one) and the images folder; `init.checkpoint` (an exgra-jax checkpoint)
or `init.hf_dir` (an HF directory, e.g. exgra-med) gives the starting weights.
"""
import ml_collections

from configs import base


def recipe(*, image_root: str, epochs: float, lr: float, global_batch: int,
           candidates: str) -> ml_collections.ConfigDict:
  c = base.get_config("llava_med_7b")
  c.stages = ("finetune",)
  f = c.finetune
  f.records = "train_w_options_new.json"
  f.val_records = "val_w_options_new.json"
  f.test_records = "test_w_options_new.json"
  f.candidates = candidates
  f.image_root = image_root
  f.epochs = epochs
  f.lr = lr
  f.global_batch = global_batch
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
