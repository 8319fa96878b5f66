import torch

# The tests use tiny tensors, where intra-op threads cost more than they give, and pytest-xdist
# already runs one worker per core.
torch.set_num_threads(1)
