import os

import torch

# Triton kernels run under the interpreter on a machine without a GPU; the variable must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
