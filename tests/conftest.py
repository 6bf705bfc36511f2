import os

# Triton kernels run on the CPU through the interpreter when no GPU is present; the variable
# must be set before triton is first imported.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
