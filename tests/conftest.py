import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # for `from exactness import ...`
# One thread: most tests run many tiny tiles, where OpenMP fan-out costs more than it
# gains (measured about 10x slower with 2 threads on a loaded 2-core machine).
torch.set_num_threads(1)
