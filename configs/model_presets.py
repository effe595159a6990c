"""Model presets: `tiny` (CPU demo and tests) and `llava_med_7b` (the release's shapes).

A preset is the `config.model` sub-tree. Field meanings:
  vision.*   CLIP vision tower (ViT, quick-GELU, pre-LN, pre-layernorm on embeddings).
  llm.*      LLaMA-family decoder; `num_kv_heads < num_heads` is grouped-query attention.
  connector  none | dci | sci | sti (dense connectors on CLIP hidden states, docs/models.md).
  connector_layers  the two CLIP hidden-state indices used by sci / sti ((7, 15) at 24 layers);
             dci averages hs[0 .. L/2-1] and hs[L/2 .. L-1] for an L-layer tower.
  projector  linear | mlpNx_gelu (e.g. mlp2x_gelu) | identity.
  image_tokens  how an image sits in the text: im_start_end (LLaVA-Med) | image (llava-hf);
             an imported checkpoint's own style replaces it (data/text.py).
"""
import ml_collections


def _vision(image_size, patch_size, hidden, layers, heads, mlp):
  v = ml_collections.ConfigDict()
  v.image_size = image_size         # input resolution (pixels, square)
  v.patch_size = patch_size         # ViT patch size
  v.hidden_size = hidden            # ViT width
  v.num_layers = layers             # transformer layers
  v.num_heads = heads               # attention heads
  v.intermediate_size = mlp         # MLP width
  v.layer_norm_eps = 1e-5           # LayerNorm epsilon
  v.select_layer = -2               # hidden state fed to the projector
  v.feature_select = "default"      # default: CLS token dropped | full: kept (llava-hf models)
  return v


def _llm(vocab, hidden, layers, heads, kv_heads, mlp, max_pos, eps):
  l = ml_collections.ConfigDict()
  l.vocab_size = vocab              # rows of the embedding and LM head (tokenizer length)
  l.hidden_size = hidden            # model width d_llm
  l.intermediate_size = mlp         # SwiGLU width
  l.num_layers = layers             # decoder layers
  l.num_heads = heads               # query heads
  l.num_kv_heads = kv_heads         # key/value heads (GQA when < num_heads)
  l.head_dim = 0                    # 0 = hidden_size // num_heads
  l.rms_norm_eps = eps              # RMSNorm epsilon
  l.rope_theta = 10000.0            # RoPE base
  l.rope_scaling = ""               # "" or JSON of an HF rope_scaling dict (llama3, linear, dynamic, yarn)
  l.max_position_embeddings = max_pos  # longest sequence the model is built for
  l.tie_word_embeddings = False     # share embedding and LM head
  return l


def tiny() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.name = "tiny"                   # preset name (recorded in checkpoints and reports)
  m.vision = _vision(112, 14, 64, 4, 4, 256)
  m.llm = _llm(1024, 128, 2, 4, 2, 344, 1024, 1e-6)
  m.connector = "none"              # none | dci | sci | sti
  m.connector_layers = (1, 2)       # sci / sti hidden-state indices
  m.projector = "mlp2x_gelu"        # linear | mlpNx_gelu | identity
  m.image_tokens = "im_start_end"   # im_start_end (LLaVA-Med) | image (llava-hf, N x <image>)
  m.dtype = "float32"               # compute dtype: float32 | bfloat16
  m.param_dtype = "float32"         # master-weight dtype
  m.remat = "none"                  # none | full | dots (rematerialisation policy)
  m.scan_layers = False             # scan the decoder layers (faster compile at depth)
  m.attention = "auto"              # auto | xla | splash | cudnn (exgra_jax/models/attention.py)
  return m


def llava_med_7b() -> ml_collections.ConfigDict:
  m = tiny()
  m.name = "llava_med_7b"
  m.vision = _vision(224, 14, 1024, 24, 16, 4096)
  # LLaMA-7B; 32000 + <im_patch>, <im_start>, <im_end> + <pad> as the release saves it.
  m.llm = _llm(32004, 4096, 32, 32, 32, 11008, 2048, 1e-5)
  m.connector_layers = (7, 15)
  m.dtype = "bfloat16"
  m.remat = "full"
  m.scan_layers = True
  return m


PRESETS = {"tiny": tiny, "llava_med_7b": llava_med_7b}


def get(name: str) -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name]()
