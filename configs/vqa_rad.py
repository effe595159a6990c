"""Fine-tune and evaluate on VQA-RAD (release settings: 15 epochs, lr 2e-5, batch 64)."""
from configs import vqa


def get_config(arg=None):
  del arg
  return vqa.recipe(image_root="images", epochs=15.0, lr=2e-5, global_batch=64,
                    candidates="candidate.json")
