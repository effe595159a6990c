"""The weights layer: model parameters from any source, to any target, with one checksum.

Why one layer: evaluation, fine-tuning, prediction, export and the tools all read "a
model" that may be a train checkpoint, a params-only checkpoint or a Hugging Face
directory; one module (`loading.load`) answers all of them the same way. It sits
above `hf/` (pure conversion between HF files and Flax arrays) and below `train/` and
`eval/`, so neither of those imports the other to get weights.
"""
