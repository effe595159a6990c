"""Dashboards, profiler spec and multi-host config errors."""
import os

import numpy as np
import pytest

from configs import base
from exgra_jax.train import distributed, metrics


def test_matching_image_puts_prediction_next_to_identity():
  pred = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])
  img = metrics.matching_image(pred)
  assert img.shape == (3, 7, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(img[:, :3, 0], pred * 255)
  np.testing.assert_array_equal(img[:, 4:, 0], np.eye(3) * 255)
  assert (img[:, 3, 0] == 127).all()
  with pytest.raises(ValueError, match="square"):
    metrics.matching_image(np.zeros((2, 3)))


def test_writer_writes_scalars_and_images(tmp_path):
  writer = metrics.create_writer(str(tmp_path))
  writer.write_scalars(1, {"loss": 1.0, "learning_rate": 1e-3})
  writer.write_images(1, {"matching": metrics.matching_image(np.eye(4))[None]})
  writer.flush()
  writer.close()
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


def test_throughput_counts_steps_and_tokens():
  t = metrics.Throughput()
  t.update(100.0)
  t.update(50.0)
  out = t.report()
  assert out["tokens_per_s"] == pytest.approx(150.0 * out["steps_per_s"] / 2)


def test_profile_steps_spec():
  assert metrics.parse_profile_steps("") is None
  assert metrics.parse_profile_steps("5:8") == (5, 8)
  for bad in ("5", "8:5", "a:b"):
    with pytest.raises(ValueError, match="profile_steps"):
      metrics.parse_profile_steps(bad)


def test_distributed_config_errors():
  config = base.get_config()
  distributed.initialize(config)  # mode none: no-op
  config.distributed.mode = "slurm"
  with pytest.raises(ValueError, match="distributed.mode"):
    distributed.initialize(config)
  config.distributed.mode = "explicit"
  with pytest.raises(ValueError, match="coordinator_address"):
    distributed.initialize(config)
  config.distributed.coordinator_address = "localhost:1234"
  config.distributed.process_id = 3
  with pytest.raises(ValueError, match="process_id"):
    distributed.initialize(config)
