"""Train step: accumulation semantics, stage masks, non-finite skip, schedule, mesh, checkpoints."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import base
from exgra_jax.models.config import LlavaConfig, num_image_tokens
from exgra_jax.models.llava import LlavaModel
from exgra_jax.train import mesh as mesh_lib, optimizer, sharding, stage_checkpoints, state, step
from exgra_jax.weights import inspection
from exgra_jax.weights.checksum import parameter_checksum

NEW_TOKENS = (1019, 1020, 1021, 1022, 1023)


@pytest.fixture(scope="module")
def setup():
  config = base.get_config()
  config.model.vision.num_layers = 1
  config.model.llm.num_layers = 1
  model = LlavaModel(LlavaConfig.from_config(config.model))
  n = num_image_tokens(config.model)
  rng = np.random.default_rng(0)
  b, t, ts = 8, n + 6, 5
  ids = rng.integers(1, 1000, (b, t)).astype(np.int32)
  image_mask = np.zeros((b, t), bool)
  image_mask[:, 2:2 + n] = True
  ids[image_mask] = NEW_TOKENS[2]
  ids[:, 1], ids[:, 2 + n] = NEW_TOKENS[1], NEW_TOKENS[3]
  labels = np.where(rng.random((b, t)) < 0.5, ids, -100).astype(np.int32)
  labels[:, -1] = ids[:, -1]
  attention = np.ones((b, t), np.int32)
  attention[1, -2:] = 0
  labels[1, -2:] = -100
  batch = {
      "pixel_values": rng.normal(size=(b, 112, 112, 3)).astype(np.float32),
      "input_ids": ids, "attention_mask": attention, "image_mask": image_mask,
      "labels": labels,
      "short_ids": rng.integers(1, 1000, (b, ts)).astype(np.int32),
      "short_mask": np.ones((b, ts), np.int32),
      "long_ids": rng.integers(1, 1000, (b, ts)).astype(np.int32),
      "long_mask": np.ones((b, ts), np.int32),
      "sample_weight": np.array([1, 1, 1, 1, 1, 1, 1, 0], np.float32),
  }
  variables = model.init(jax.random.key(0), ids[:1], attention[:1], image_mask[:1],
                         batch["pixel_values"][:1])
  params = dict(nn.unbox(variables["params"]))
  params["gnn"] = {"scale": jnp.array(1.5, jnp.float32)}
  return config, model, params, batch


def quadratic_alignment(gnn_params, f_image, f_short, f_long, key):
  """A differentiable per-group loss standing in for the graph loss in accumulation tests."""
  del key
  per_group = gnn_params["scale"] * (jnp.mean((f_image - f_short) ** 2, axis=(1, 2))
                                     + jnp.mean((f_image - f_long) ** 2, axis=(1, 2)))
  return per_group.mean(), {"per_group_max": per_group.max()}


def reference_loss(params, model, batch, micro_batches, group_size, alpha):
  """Direct full-batch loss under the documented semantics, written independently."""
  mp = {k: v for k, v in params.items() if k != "gnn"}
  out = model.apply({"params": mp}, batch["input_ids"], batch["attention_mask"],
                    batch["image_mask"], batch["pixel_values"])
  logp = jax.nn.log_softmax(out["logits"][:, :-1], -1)
  tgt = batch["labels"][:, 1:]
  mask = (tgt != -100) & (batch["sample_weight"][:, None] > 0)
  nll = -jnp.take_along_axis(logp, jnp.where(mask, tgt, 0)[..., None], -1)[..., 0]
  lm = jnp.sum(nll * mask) / mask.sum()
  f_i = out["image_features"].mean(1)
  f_s = model.apply({"params": mp}, batch["short_ids"], batch["short_mask"],
                    method="text_features")
  f_l = model.apply({"params": mp}, batch["long_ids"], batch["long_mask"],
                    method="text_features")
  b = f_i.shape[0]
  losses = []
  for i in range(micro_batches):
    members = np.arange(i, b, micro_batches)
    for g0 in range(0, len(members), group_size):
      idx = members[g0:g0 + group_size]
      losses.append(quadratic_alignment(params["gnn"], f_i[idx][None], f_s[idx][None],
                                        f_l[idx][None], None)[0])
  return lm + alpha * jnp.mean(jnp.stack(losses))


def sgd_state(params):
  tx = optax.sgd(1.0)
  return tx, state.create_train_state(params, tx, 0)


def test_accumulation_matches_one_large_batch(setup):
  config, model, params, batch = setup
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  results = {}
  for m in (1, 4):
    tx, st = sgd_state(params)
    fn = step.make_train_step(model, tx, optax.constant_schedule(1.0), micro_batches=m,
                              align_fn=quadratic_alignment, alpha=0.7, group_size=2)
    new, metrics = jax.jit(fn)(st, batch)
    grads = jax.tree_util.tree_map(lambda new_p, old_p: old_p - new_p, new.params, st.params)
    results[m] = (metrics["loss"], grads)
    ref_loss, ref_grads = jax.value_and_grad(reference_loss)(params, model, batch, m, 2, 0.7)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5, atol=1e-6)
    flat_ref = jax.tree_util.tree_leaves(ref_grads)
    for got, want in zip(jax.tree_util.tree_leaves(grads), flat_ref):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # LM part alone is independent of M: compare the two LM losses exactly.
  for m in (1, 4):
    tx, st = sgd_state(params)
    fn = step.make_train_step(model, tx, optax.constant_schedule(1.0), micro_batches=m)
    results[("lm", m)] = jax.jit(fn)(st, batch)
  np.testing.assert_allclose(results[("lm", 1)][1]["loss"], results[("lm", 4)][1]["loss"],
                             rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(results[("lm", 1)][0].params),
                  jax.tree_util.tree_leaves(results[("lm", 4)][0].params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _stage(trainable):
  s = base.stage_config("stage1")
  s.trainable = trainable
  s.warmup_ratio = 0.0
  s.lr = 1e-2
  return s


def test_stage1_mask_freezes_all_but_projector_and_new_token_rows(setup):
  config, model, params, batch = setup
  params = {k: v for k, v in params.items() if k != "gnn"}
  tx, schedule = optimizer.build_optimizer(params, config.optim, _stage("projector_and_new_tokens"),
                                           10, NEW_TOKENS)
  st = state.create_train_state(params, tx, 0)
  fn = jax.jit(step.make_train_step(model, tx, schedule))
  new, _ = fn(st, {k: jnp.asarray(v) for k, v in batch.items()})
  new, _ = fn(new, {k: jnp.asarray(v) for k, v in batch.items()})
  old_flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, value in jax.tree_util.tree_flatten_with_path(new.params)[0]:
    keys = tuple(p.key for p in path)
    before = np.asarray(old_flat[path])
    if keys[0] == "projector":
      assert not np.array_equal(value, before), keys
    elif keys == optimizer.EMBEDDING_PATH:
      rows = np.setdiff1d(np.arange(before.shape[0]), NEW_TOKENS)
      np.testing.assert_array_equal(np.asarray(value)[rows], before[rows])
      # <im_patch> rows are replaced by image features (no gradient); <im_start> is learnt.
      assert not np.array_equal(np.asarray(value)[NEW_TOKENS[1]], before[NEW_TOKENS[1]])
    elif keys == optimizer.LM_HEAD_PATH:
      cols = np.setdiff1d(np.arange(before.shape[1]), NEW_TOKENS)
      np.testing.assert_array_equal(np.asarray(value)[:, cols], before[:, cols])
      assert not np.array_equal(np.asarray(value)[:, NEW_TOKENS], before[:, NEW_TOKENS])
    else:
      np.testing.assert_array_equal(value, before, err_msg=str(keys))



@pytest.mark.parametrize("trainable", ["projector_and_new_tokens", "all_but_vision"])
def test_no_gradient_is_taken_for_frozen_leaves(setup, trainable):
  """With `frozen` the step differentiates the trainable leaves only: the same update as
  differentiating everything (the optimizer discards frozen gradients anyway), a gradient
  norm over the trainable leaves, and in stage 1 fewer matmuls (no weight gradients of the
  frozen LM layers)."""
  config, model, params, batch = setup
  params = {k: v for k, v in params.items() if k != "gnn"}
  tx, schedule = optimizer.build_optimizer(params, config.optim, _stage(trainable), 10,
                                           NEW_TOKENS)
  st = state.create_train_state(params, tx, 0)
  frozen = optimizer.frozen_leaves(params, trainable)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  all_grads = step.make_train_step(model, tx, schedule)
  trainable_grads = step.make_train_step(model, tx, schedule, frozen=frozen)
  (new_all, m_all), (new_frozen, m_frozen) = (jax.jit(f)(st, batch)
                                              for f in (all_grads, trainable_grads))
  for a, b in zip(jax.tree_util.tree_leaves(new_all.params),
                  jax.tree_util.tree_leaves(new_frozen.params)):
    # Adam divides by sqrt(v): near-zero gradients amplify float reassociation in the
    # backward; 1e-5 is 0.1 % of one step of lr 1e-2.
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  np.testing.assert_allclose(m_frozen["loss"], m_all["loss"], rtol=1e-6)

  def loss(p):
    return step.make_loss_fn(model)(p, batch, jnp.float32(
        step.supervised_token_mask(batch["labels"], batch["sample_weight"]).sum()), 1.0,
                                    jax.random.key(0))[0]
  grads = jax.grad(loss)(params)
  trainable_norm = optax.tree.norm(jax.tree_util.tree_map(
      lambda f, g: jnp.zeros_like(g) if f else g, frozen, grads))
  np.testing.assert_allclose(m_frozen["grad_norm"], trainable_norm, rtol=1e-5)
  if trainable == "projector_and_new_tokens":
    # Differentiating everything gave the frozen LM weights gradients (and matmuls for
    # them); the vision tower's output is stop-gradiented by the model in both stages.
    assert m_all["grad_norm"] > m_frozen["grad_norm"]
    matmuls = [str(jax.make_jaxpr(f)(st, batch)).count("dot_general")
               for f in (all_grads, trainable_grads)]
    assert matmuls[1] < matmuls[0], matmuls


def test_all_but_vision_freezes_the_tower_only(setup):
  config, model, params, batch = setup
  params = {k: v for k, v in params.items() if k != "gnn"}
  tx, schedule = optimizer.build_optimizer(params, config.optim, _stage("all_but_vision"), 10)
  st = state.create_train_state(params, tx, 0)
  new, _ = jax.jit(step.make_train_step(model, tx, schedule))(
      st, {k: jnp.asarray(v) for k, v in batch.items()})
  for a, b in zip(jax.tree_util.tree_leaves(params["vision"]),
                  jax.tree_util.tree_leaves(new.params["vision"])):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(params["llm"]["norm"]["scale"], new.params["llm"]["norm"]["scale"])


def test_non_finite_loss_skips_the_update(setup):
  config, model, params, batch = setup
  params = {k: v for k, v in params.items() if k != "gnn"}
  tx, schedule = optimizer.build_optimizer(params, config.optim, _stage("all_but_vision"), 10)
  st = state.create_train_state(params, tx, 0)
  bad = {k: jnp.asarray(v) for k, v in batch.items()}
  bad["pixel_values"] = bad["pixel_values"].at[0, 0, 0, 0].set(jnp.nan)
  new, metrics = jax.jit(step.make_train_step(model, tx, schedule))(st, bad)
  assert not np.isfinite(metrics["loss"])
  assert int(new.skipped) == 1 and int(new.step) == 1
  for a, b in zip(jax.tree_util.tree_leaves((st.params, st.opt_state)),
                  jax.tree_util.tree_leaves((new.params, new.opt_state))):
    np.testing.assert_array_equal(a, b)


def test_schedule_warmup_then_cosine():
  sched = optimizer.learning_rate_schedule(1.0, 100, 0.1)
  np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(55), sched(100)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  flat = optimizer.learning_rate_schedule(2.0, 10, 0.0, "constant")
  assert float(flat(7)) == 2.0
  with pytest.raises(ValueError, match="warmup_ratio"):
    optimizer.learning_rate_schedule(1.0, 10, 1.5)
  with pytest.raises(ValueError, match="schedule"):
    optimizer.learning_rate_schedule(1.0, 10, 0.1, "linear")


def test_bad_trainable_and_missing_token_ids(setup):
  config, _, params, _ = setup
  with pytest.raises(ValueError, match="trainable"):
    optimizer.trainable_labels(params, "everything")
  with pytest.raises(ValueError, match="new token ids"):
    optimizer.build_optimizer(params, config.optim, _stage("projector_and_new_tokens"), 10)


def test_mesh_shape_resolution_and_errors():
  assert mesh_lib.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  assert mesh_lib.resolve_mesh_shape((1, 1, 1), 1) == (1, 1, 1)
  with pytest.raises(ValueError, match="at most one"):
    mesh_lib.resolve_mesh_shape((-1, -1, 1), 8)
  with pytest.raises(ValueError, match="does not divide"):
    mesh_lib.resolve_mesh_shape((-1, 3, 1), 8)
  with pytest.raises(ValueError, match="needs 4 devices"):
    mesh_lib.resolve_mesh_shape((2, 2, 1), 8)
  mesh = mesh_lib.build_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
  assert mesh.axis_names == mesh_lib.MESH_AXES


def test_checkpoint_round_trip_keeps_newest(setup, tmp_path):
  config, model, params, _ = setup
  params = {k: v for k, v in params.items() if k != "gnn"}
  tx, _ = optimizer.build_optimizer(params, config.optim, _stage("all_but_vision"), 10)
  st = state.create_train_state(params, tx, 3)
  mesh = mesh_lib.build_mesh(config.mesh)
  ckpt = stage_checkpoints.StageCheckpointer(str(tmp_path), every=2, keep=2, async_save=True)
  for s in range(1, 6):
    ckpt.save(s, st.replace(step=jnp.asarray(s, jnp.int32)), {"position": s},
              config.model.to_dict())
  ckpt.wait()
  assert ckpt.latest_step() == 4
  assert ckpt.manager.all_steps() == [2, 4]
  abstract = stage_checkpoints.abstract_with_shardings(
      st, jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), st))
  restored, data, model_config = ckpt.restore(4, abstract)
  ckpt.close()
  assert int(restored.step) == 4 and data == {"position": 4}
  assert model_config["llm"]["hidden_size"] == config.model.llm.hidden_size
  for a, b in zip(jax.tree_util.tree_leaves(st.params), jax.tree_util.tree_leaves(restored.params)):
    np.testing.assert_array_equal(a, b)


def test_inspect_checkpoint_reports_step_shapes_and_checksum(setup, tmp_path):
  config, _, params, _ = setup
  params = {k: v for k, v in params.items() if k != "gnn"}
  tx, _ = optimizer.build_optimizer(params, config.optim, _stage("all_but_vision"), 10)
  st = state.create_train_state(params, tx, 0).replace(step=jnp.asarray(7, jnp.int32))
  ckpt = stage_checkpoints.StageCheckpointer(str(tmp_path), every=1, keep=1, async_save=False)
  ckpt.save(7, st, {}, config.model.to_dict())
  ckpt.close()
  info = inspection.read_checkpoint(str(tmp_path / "7"))
  assert info["step"] == 7
  assert info["shapes"]["llm/embed_tokens/embedding"] == ((1024, 128), "float32")
  assert info["checksum"] == parameter_checksum(params)
  changed = jax.tree_util.tree_map(lambda x: x, params)
  changed["llm"]["norm"]["scale"] = changed["llm"]["norm"]["scale"].at[0].add(1e-7)
  assert parameter_checksum(changed) != info["checksum"]
  assert inspection.read_checkpoint(str(tmp_path))["checksum"] == info["checksum"]  # newest
  with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
    inspection.read_checkpoint(str(tmp_path / "7" / "state"))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "tools/inspect_checkpoint.py",
                        f"--checkpoint={tmp_path / '7'}"], capture_output=True, text=True,
                       cwd=root, env={**os.environ, "PYTHONPATH": root},
                       check=True)
  assert "step 7" in out.stdout and info["checksum"] in out.stdout


def test_sigterm_sets_the_preemption_flag_instead_of_killing():
  import signal
  flag = stage_checkpoints.PreemptionFlag()
  try:
    assert not flag.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.requested
  finally:
    flag.restore_handler()


def test_resume_from_checkpoint_is_bit_exact(setup, tmp_path):
  """10 uninterrupted steps vs 6 steps, save, restore into a fresh process state, 4 more."""
  config, model, params, batch = setup
  params = {k: v for k, v in params.items() if k != "gnn"}
  tx, schedule = optimizer.build_optimizer(params, config.optim, _stage("all_but_vision"), 10)
  train_step = jax.jit(step.make_train_step(model, tx, schedule, micro_batches=2))
  batch = {k: jnp.asarray(v[:4]) for k, v in batch.items()}
  st = state.create_train_state(params, tx, 0)
  for _ in range(10):
    st, _ = train_step(st, batch)
  resumed = state.create_train_state(params, tx, 0)
  for _ in range(6):
    resumed, _ = train_step(resumed, batch)
  ckpt = stage_checkpoints.StageCheckpointer(str(tmp_path), every=1, keep=1, async_save=True)
  ckpt.save(6, resumed, {"consumed": 24}, config.model.to_dict())
  ckpt.wait()
  fresh = state.create_train_state(params, tx, 0)
  mesh = mesh_lib.build_mesh(config.mesh)
  abstract = stage_checkpoints.abstract_with_shardings(
      fresh, jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), fresh))
  resumed, data, _ = ckpt.restore(ckpt.latest_step(), abstract)
  ckpt.close()
  assert data == {"consumed": 24} and int(resumed.step) == 6
  for _ in range(4):
    resumed, _ = train_step(resumed, batch)
  assert (parameter_checksum(resumed.params)
          == parameter_checksum(st.params))
  assert (parameter_checksum(resumed.opt_state)
          == parameter_checksum(st.opt_state))
