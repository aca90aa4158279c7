import os

import torch

# Without a GPU, run the triton backend through Triton's interpreter. It must be set before triton is
# first imported (triton fixes its library functions at import), hence here, at the root.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
