"""The run directory's one owner (`run_paths.RunDir`) and the config's data paths."""
import ml_collections
import pytest

from exgra_jax import run_paths


def test_layout_and_which_checkpoint_answers(tmp_path):
  run = run_paths.RunDir(tmp_path)
  assert run.stage("stage2") == tmp_path / "checkpoints" / "stage2"
  assert run.best() == tmp_path / "checkpoints" / "finetune_best"
  assert run.tensorboard("stage1") == tmp_path / "tensorboard" / "stage1"
  assert run.eval("test", "finetune") == tmp_path / "eval" / "finetune" / "test"
  assert run.eval("test_w_options_new") == tmp_path / "eval" / "test_w_options_new"
  assert run.export("llava") == tmp_path / "export" / "llava"
  assert run.config_json == tmp_path / "config.json"
  stages = ("stage1", "stage2", "finetune")
  # No best params yet: the last stage's checkpoints answer; then the best ones do.
  assert run.answering_checkpoint(stages) == tmp_path / "checkpoints" / "finetune"
  run.best().mkdir(parents=True)
  assert run.answering_checkpoint(stages) == run.best()
  assert run.answering_checkpoint(("stage1", "stage2")) == run.stage("stage2")
  assert run.export_source(stages) == run.stage("finetune")
  step = run.stage("stage2") / "15"
  assert run_paths.RunDir.of_train_step(step).root == tmp_path


def test_data_paths_and_the_tokenizer():
  config = ml_collections.ConfigDict({
      "data": {"root": "/data", "tokenizer_dir": "tok"},
      "init": {"hf_dir": "", "llm_dir": "/weights/llama"}})
  assert str(run_paths.resolve_path("/data", "a/b.json")) == "/data/a/b.json"
  assert str(run_paths.resolve_path("/data", "/abs/b.json")) == "/abs/b.json"
  assert str(run_paths.resolve_path("", "rel.json")) == "rel.json"
  assert run_paths.tokenizer_dir(config) == "/data/tok"
  config.data.tokenizer_dir = ""
  assert run_paths.tokenizer_dir(config) == "/weights/llama"
  config.init.llm_dir = ""
  with pytest.raises(ValueError, match="no tokenizer"):
    run_paths.tokenizer_dir(config)
