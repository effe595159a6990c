"""The ExGra-Med recipe on a PMC-15M subset (shared by pmc10.py, pmc40.py, pmc100.py).

Stage 1 aligns the projector on `llava_med_alignment_500k.json`; stage 2 instruction-tunes
everything but the vision tower on `llava_med_instruct_60k_inline_mention` with extended
captions (`conversations_long`) and the multi-graph alignment loss. Both read the same
nested subset fraction. Point `data.root` at the LLaVA-Med data folder (holding the two
record files and `images/`). The start of stage 1, as the README's step 6 does it: import
LLaMA-7B + CLIP ViT-L/14 (224 px) once with `tools/import_hf.py --add_tokens
--projector=mlp2x_gelu --scan_layers --out=DIR`, then `init.checkpoint=DIR` and
`data.tokenizer_dir=DIR/tokenizer` (the tokenizer with the image tokens added).
"""
import ml_collections

from configs import base


def recipe(fraction: float, arg: str | None) -> ml_collections.ConfigDict:
  """`arg`: "" (stage 1 then stage 2), "stage1" or "stage2"."""
  c = base.get_config("llava_med_7b")
  if arg in (None, ""):
    c.stages = ("stage1", "stage2")
  elif arg in ("stage1", "stage2"):
    c.stages = (arg,)
  else:
    raise ValueError(f"pmc recipe argument must be '', 'stage1' or 'stage2', got {arg!r}")
  c.stage1.records = "llava_med_alignment_500k.json"
  c.stage1.subset_fraction = fraction
  c.stage2.records = "llava_med_instruct_60k_inline_mention_long.json"
  c.stage2.subset_fraction = fraction
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
