"""ExGra-Med on the 10 % PMC-15M subsets: `--config=configs/pmc10.py[:stage1|:stage2]`."""
from configs import pmc


def get_config(arg=None):
  return pmc.recipe(0.1, arg)
