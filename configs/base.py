"""The documented base configuration of exgra-jax: every field, its default and its meaning.

Recipe files (`demo.py`, `pmc10.py`, `vqa_rad.py`, ...) start from `get_config()` here and
change what their recipe needs. Any field can be overridden on the command line:

    python -m exgra_jax.main --config=configs/pmc10.py:stage2 --workdir=/ckpt/run1 \
        --config.stage2.lr=1e-5 --config.mesh.fsdp=8

A run executes the stages named in `config.stages` in order, in one workdir; each stage
has its own sub-config (`config.stage1`, `config.stage2`, `config.finetune`) so that a
recipe states its whole schedule in one place. `exgra_jax.run_config.validate` checks the
resolved config at start-up (types, allowed values, batch / mesh divisibility, connector
and projector widths) and explains every error.
"""
import ml_collections

from configs import model_presets

# Stage names, in the order a full recipe runs them.
STAGE_NAMES = ("stage1", "stage2", "finetune")


def stage_config(kind: str) -> ml_collections.ConfigDict:
  """Defaults of one training stage, following the release (docs/train.md)."""
  s = ml_collections.ConfigDict()
  s.records = ""              # JSON / JSONL record file (relative to data.root unless absolute)
  s.image_root = "images"     # image folder (relative to data.root unless absolute)
  s.val_records = ""          # validation records (finetune: VQA val split; "" = none)
  s.test_records = ""         # records evaluated after the stage ("" = none)
  s.candidates = ""           # candidate.json for open-question accuracy with candidates
  s.subset_fraction = 1.0     # deterministic nested subset of the records (0.1 = pmc10)
  s.subset_ids = ""           # file with one record id per line; overrides subset_fraction
  s.trainable = "all_but_vision"  # projector_and_new_tokens | all_but_vision
  s.align = False             # add the multi-graph alignment loss (stage 2)
  s.global_batch = 64         # samples per optimizer step over all devices
  s.micro_batches = 1         # gradient accumulation: global_batch = micro_batches * micro size
  s.lr = 2e-5                 # peak learning rate
  s.epochs = 1.0              # passes over the (subset) records
  s.max_steps = -1            # stop after this many steps (-1 = from epochs)
  s.warmup_ratio = 0.03       # linear warm-up, fraction of the stage's steps
  s.init_from = ""            # checkpoint to start from ("" = the previous stage / init)
  s.select_metric = "open_recall_closed_acc"  # finetune: validation metric for best ckpt
  # LoRA / QLoRA adapters on the LLM (exgra_jax/models/adapters.py, qwix). rank 0 = off: the
  # release's full fine-tuning. With adapters the LLM trains only them; the rest of the
  # stage's trainable set (projector; GNN in stage 2) trains as without.
  s.lora = ml_collections.ConfigDict()
  s.lora.rank = 0             # adapter rank r (0 = no adapters)
  s.lora.alpha = 16.0         # the update is (alpha / r) * x @ A @ B
  s.lora.dropout = 0.0        # dropout on the adapters' input while training
  s.lora.modules = ""         # regex of adapted module paths ("" = LLM attention + MLP projections)
  s.lora.base = "float32"     # frozen LLM: float32 | bf16 | int8 | int4 (QLoRA) (docs/train.md)
  s.lora.train_also = ""      # regex of LLM leaves trained beside the adapters (PEFT's
                              # modules_to_save): "llm/lm_head/kernel" (docs/train.md)
  if kind == "stage1":
    s.trainable = "projector_and_new_tokens"
    s.global_batch = 128
    s.lr = 2e-3
  elif kind == "stage2":
    s.align = True
    s.epochs = 3.0
  elif kind == "finetune":
    s.epochs = 15.0
  else:
    raise ValueError(f"unknown stage kind {kind!r}; expected one of {STAGE_NAMES}")
  return s


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Base config. `arg` is an optional model preset name (see configs/model_presets.py)."""
  c = ml_collections.ConfigDict()
  c.seed = 0                        # seeds params init, data order, dropout and graph noise
  c.stages = ("stage1", "stage2")   # stages run in order by --mode=train
  c.stage1 = stage_config("stage1")
  c.stage2 = stage_config("stage2")
  c.finetune = stage_config("finetune")

  # --- model ---------------------------------------------------------------------------
  c.model = model_presets.get(arg or "tiny")

  # --- where weights come from (local directories only; nothing is downloaded) ---------
  c.init = ml_collections.ConfigDict()
  c.init.hf_dir = ""                # LLaVA / LLaVA-Med / ExGra-Med HF directory to import
  c.init.llm_dir = ""               # plain LLaMA-family HF directory (start of stage 1)
  c.init.clip_dir = ""              # CLIP HF directory (vision tower weights)
  c.init.checkpoint = ""            # an exgra-jax Orbax checkpoint to start from
  c.init.random = False             # allow random init (demo / tests); else weights required

  # --- contrastive pre-training of a random vision tower (demo only) -------------------
  # A real run starts from pretrained CLIP weights. Without them (init.random) the demo
  # pre-trains its tiny tower CLIP-style on the stage-1 image/caption pairs before the
  # first stage, which then freezes it as the release does (train/vision_pretrain.py).
  c.vision_pretrain = ml_collections.ConfigDict()
  c.vision_pretrain.steps = 0       # optimizer steps (0 = off: the tower is used as loaded)
  c.vision_pretrain.global_batch = 64  # image/caption pairs per step (the InfoNCE negatives)
  c.vision_pretrain.lr = 1e-3       # AdamW peak learning rate (warm-up 5 %, cosine decay)
  c.vision_pretrain.weight_decay = 0.0  # AdamW decoupled weight decay
  c.vision_pretrain.embed_dim = 64  # width of the shared image/caption embedding space

  # --- multi-graph alignment (docs/align.md) ---------------------------------------
  c.align = ml_collections.ConfigDict()
  c.align.alpha = 1.0               # weight of L_align in LM + alpha * L_align
  c.align.num_neighbors = 5         # k of the kNN graphs (Euclidean, no self loops)
  c.align.gnn_layers = 2            # GraphConv layers (max aggregation)
  c.align.gnn_width = 0             # GNN width (0 = the LLM width)
  c.align.gnn_dropout = 0.1         # dropout after the last GNN layer
  c.align.gumbel_scale = 0.05       # scale of the Gumbel noise on node and edge affinities
  c.align.imle_lambda = 80.0        # IMLE perturbation strength
  c.align.imle_samples = 1          # noise samples averaged in the IMLE estimate
  c.align.imle_noise = "gumbel"     # gumbel | sum_of_gamma | none
  c.align.group_size = 16           # samples per graph, grouping=fixed (0: the micro-batch)
  c.align.grouping = "per_device"   # per_device (release) | fixed (group_size) | global
  c.align.text_mode = "default"     # f_S / f_L texts and pooling: default | release (docs/align.md)
  c.align.solver_iterations = 100   # solver iteration budget (deterministic)
  c.align.solver_time_limit_s = 0.0 # per-problem wall-clock cap (0 = none); counted if hit
  c.align.solver_threads = 0        # host threads for the batched solve (0 = all cores)

  # --- data ----------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.root = ""                  # dataset root; relative stage paths resolve against it
  c.data.demo_world = ""            # "", "small" or "medium": generate the demo world here
  c.data.demo_seed = 0              # seed of the generated world (not c.seed: seeds share a world)
  c.data.tokenizer_dir = ""         # HF tokenizer dir, relative to data.root ("" = init.hf_dir / llm_dir's)
  c.data.max_length = 2048          # tokens per conversation (longer: truncated, counted)
  c.data.length_buckets = (512, 1024, 2048)  # padded lengths (few compiled shapes)
  c.data.text_max_length = 512      # tokens of the alignment texts (short / long; release: 2048)
  c.data.label_mode = "per_turn"    # per_turn (clean) | release (release masking)
  c.data.workers = 2                # grain worker processes decoding images
  c.data.prefetch = 2               # batches made ahead per worker (or in-process thread)
  c.data.shuffle = True             # seeded shuffle each epoch
  c.data.max_bad_fraction = 0.01    # stop the run when more records than this are bad

  # --- optimizer (shared by all stages; lr and warm-up per stage) ----------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.b1 = 0.9                  # AdamW beta1
  c.optim.b2 = 0.999                # AdamW beta2
  c.optim.eps = 1e-8                # AdamW epsilon
  c.optim.weight_decay = 0.0        # AdamW decoupled weight decay
  c.optim.clip_norm = 1.0           # global gradient-norm clip
  c.optim.schedule = "cosine"       # cosine | constant (after warm-up)

  # --- mesh and sharding ---------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                  # data-parallel axis size (-1 = fill with devices)
  c.mesh.fsdp = 1                   # fully-sharded data-parallel axis size
  c.mesh.tensor = 1                 # tensor-parallel axis size
  c.logical_axis_rules = (  # logical axis -> mesh axes (MaxText vocabulary); None = replicated
      ("batch", ("data", "fsdp")),
      ("length", None),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("head_dim", None),
      ("vocab", "tensor"),
      ("vision_embed", None),
      ("vision_mlp", "tensor"),
      ("vision_heads", "tensor"),
      ("gnn", None),
  )

  # --- multi-host start-up (jax.distributed.initialize) ---------------------------------
  c.distributed = ml_collections.ConfigDict()
  c.distributed.mode = "none"       # none | auto (TPU / SLURM detection) | explicit (fields below)
  c.distributed.coordinator_address = ""  # explicit: "host:port" of process 0
  c.distributed.num_processes = 1   # explicit: total processes
  c.distributed.process_id = 0      # explicit: this process's index
  c.distributed.cpu_collectives = "gloo"  # CPU-only runs: collectives implementation (gloo | mpi)

  # --- checkpoints, logs, dashboards ---------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.log_every = 10            # steps between scalar summaries
  c.train.image_every = 100         # steps between matching-matrix images
  c.train.checkpoint_every = 500    # steps between checkpoints
  c.train.keep_checkpoints = 3      # checkpoints kept per stage
  c.train.async_checkpoint = True   # write checkpoints in the background
  c.train.eval_every = 0            # finetune: steps between validations (0 = per epoch)
  c.train.profile_steps = ""        # "start:stop" steps to trace with the profiler ("" = off)

  # --- evaluation and generation (docs/eval.md) ----------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.template = "simple"        # simple (release inference prompt) | train | none
  c.eval.max_new_tokens = 1024      # greedy decoding limit
  c.eval.temperature = 0.0          # 0 = greedy
  c.eval.stop = "###"               # stop string
  c.eval.batch_size = 8             # prompts decoded together
  c.eval.records = ""               # records for --mode=eval ("" = finetune.test_records)
  c.eval.quantize = ""              # "" | int8 | int4: weight-only LLM projections (docs/train.md)

  # --- export to Hugging Face format ---------------------------------------------------
  c.export = ml_collections.ConfigDict()
  c.export.after_training = False   # export the final checkpoint when --mode=train ends
  c.export.layout = "llava"         # llava (transformers-native) | release (LLaVA-Med)
  c.export.shard_size_gb = 5.0      # safetensors shard size
  return c
