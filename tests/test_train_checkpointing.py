"""A damaged newest checkpoint: reported by path and reason, moved aside, the newest step
that restores is used; when none restores, one error names the directory, nothing moved."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from exgra_jax.train import stage_checkpoints, state


def _delete_state_metadata(step_dir: str) -> None:
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _truncate_a_data_file(step_dir: str) -> None:
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def _overwrite_data_metadata(step_dir: str) -> None:
  with open(os.path.join(step_dir, "data", "metadata"), "wb") as f:
    f.write(b"\xff\xfe not JSON")


CORRUPTIONS = [_delete_state_metadata, _truncate_a_data_file, _overwrite_data_metadata]


def _state(step: int) -> state.TrainState:
  params = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) + step,
            "b": jnp.full((64,), step, jnp.float32)}
  return state.create_train_state(params, optax.adam(1e-3), 0).replace(
      step=jnp.asarray(step, jnp.int32))


def _saved(directory: str, steps=(2, 4, 6)) -> stage_checkpoints.StageCheckpointer:
  ckpt = stage_checkpoints.StageCheckpointer(directory, every=2, keep=5, async_save=False)
  for s in steps:
    ckpt.save(s, _state(s), {"position": s}, {"name": "tiny"}, validation={"best_step": s})
  ckpt.wait()
  ckpt.close()
  return stage_checkpoints.StageCheckpointer(directory, every=2, keep=5, async_save=False)


def _abstract():
  st = _state(0)
  return stage_checkpoints.abstract_with_shardings(st, jax.tree.map(lambda x: x.sharding, st))


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_damaged_newest_step_is_moved_aside_and_an_older_one_restores(tmp_path, corrupt,
                                                                      caplog):
  directory = str(tmp_path / "stage2")
  _saved(directory).close()
  corrupt(os.path.join(directory, "6"))
  ckpt = stage_checkpoints.StageCheckpointer(directory, every=2, keep=5, async_save=False)
  restored = ckpt.restore_newest(_abstract())
  assert restored.step == 4 and int(restored.state.step) == 4
  assert restored.data == {"position": 4} and restored.model_config == {"name": "tiny"}
  assert restored.validation == {"best_step": 4}
  np.testing.assert_array_equal(restored.state.params["w"], _state(4).params["w"])
  assert ckpt.manager.all_steps() == [2, 4]
  assert sorted(os.listdir(tmp_path / "stage2_unrestorable")) == ["6"]
  assert f"{directory}/6 cannot be restored" in caplog.text
  # Training on writes step 6 again beside the moved one.
  ckpt.save(6, _state(6), {"position": 6}, {"name": "tiny"}, force=True)
  ckpt.wait()
  restored = ckpt.restore_newest(_abstract())
  assert restored.step == 6 and restored.validation == {}  # saved without one
  ckpt.close()


def test_no_step_restores_is_one_error_naming_the_directory(tmp_path):
  directory = str(tmp_path / "stage2")
  _saved(directory, steps=(2, 4)).close()
  for step, corrupt in zip((2, 4), CORRUPTIONS[1:]):
    corrupt(os.path.join(directory, str(step)))
  ckpt = stage_checkpoints.StageCheckpointer(directory, every=2, keep=5, async_save=False)
  with pytest.raises(stage_checkpoints.NoRestorableCheckpoint,
                     match=rf"(?s)no checkpoint in {directory} can be restored.*"
                           rf"{directory}/4: UnicodeDecodeError.*{directory}/2: "):
    ckpt.restore_newest(_abstract())
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["2", "4"]
  assert not os.path.exists(tmp_path / "stage2_unrestorable")


def test_no_checkpoint_is_none(tmp_path):
  ckpt = stage_checkpoints.StageCheckpointer(str(tmp_path / "s"), every=1, keep=1,
                                         async_save=False)
  assert ckpt.restore_newest(_abstract()) is None
  ckpt.close()
