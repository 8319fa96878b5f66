import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated (at import), so it is set here, before any
# test module imports triton, in every pytest worker. Without a GPU the Triton kernels then run on CPU
# tensors under the interpreter, and the tests hold them against the torch reference.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests use tiny tensors, where intra-op threads cost more than they give, and pytest-xdist
# already runs one worker per core.
torch.set_num_threads(1)
