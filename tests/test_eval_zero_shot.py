"""OmniMedVQA-style prompts and difflib option mapping on hand-worked cases."""
import pytest

from exgra_jax.eval import zero_shot


def test_prompt_lists_options_and_instruction():
  prompt = zero_shot.build_prompt("What modality is shown?", ["CT", "MRI"])
  assert prompt == ("What modality is shown? Here are 2 candidate answers:\nCT\nMRI\n"
                    "Only return what you think is the correct answer from the candidate "
                    "answers, do not return any other irrelevant text!")


def test_map_to_option_uses_sequence_matcher_ratio():
  options = ["Chest X-ray", "Brain MRI", "Abdominal CT"]
  assert zero_shot.map_to_option("brain mri", options) == "Brain MRI"
  assert zero_shot.map_to_option("The answer is Chest X-ray.", options) == "Chest X-ray"
  # equal ratios: the first option wins
  assert zero_shot.map_to_option("", ["ab", "cd"]) == "ab"


def test_accuracy_per_dataset_and_option_fields():
  items = [{"question_id": "1", "dataset": "A", "option_A": "yes", "option_B": "no",
            "gt_answer": "no"},
           {"question_id": "2", "dataset": "A", "options": ["cat", "dog"], "gt_answer": "cat"},
           {"question_id": "3", "dataset": "B", "options": ["cat", "dog"], "gt_answer": "cat"}]
  result = zero_shot.accuracy_per_dataset(items, {"1": "No.", "2": "dog", "3": "a cat"})
  assert result["A"] == {"accuracy": 0.5, "count": 2}
  assert result["B"] == {"accuracy": 1.0, "count": 1}
  assert result["overall"]["accuracy"] == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="no prediction"):
    zero_shot.accuracy_per_dataset(items, {})
  with pytest.raises(ValueError, match="at least two options"):
    zero_shot.item_options({"id": 1, "options": ["x"]})
