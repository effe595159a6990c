"""Fine-tune and evaluate on PathVQA (release settings: 18 epochs, lr 4e-5, batch 128)."""
from configs import vqa


def get_config(arg=None):
  del arg
  return vqa.recipe(image_root="images", epochs=18.0, lr=4e-5, global_batch=128,
                    candidates="candidate.json")
