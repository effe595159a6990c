"""ExGra-Med on the 100 % PMC-15M subsets: `--config=configs/pmc100.py[:stage1|:stage2]`."""
from configs import pmc


def get_config(arg=None):
  return pmc.recipe(1.0, arg)
