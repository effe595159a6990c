"""ExGra-Med on the 40 % PMC-15M subsets: `--config=configs/pmc40.py[:stage1|:stage2]`."""
from configs import pmc


def get_config(arg=None):
  return pmc.recipe(0.4, arg)
