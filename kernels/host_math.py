"""Helpers for the launchers' host code.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``ConstexprFunction`` objects since Triton 3.5 and cost ~2.6 us a
call on the host (constexpr unwrapping); a model forward plans its launches with hundreds of such calls, which at
small batches is host time the GPU waits for. These are the plain-int equivalents."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1), as ``triton.next_power_of_2``."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (torch caches the device's properties)."""
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count
