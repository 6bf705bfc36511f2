"""Helpers for the launchers' host code.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``ConstexprFunction`` objects since Triton 3.5 and cost ~2.6 us a
call on the host (constexpr unwrapping); a model forward plans its launches with hundreds of such calls, which at
small batches is host time the GPU waits for. These are the plain-int equivalents."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1), as ``triton.next_power_of_2``."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def programs_per_sm(regs: int, num_warps: int, shared_bytes: int = 0) -> int:
    """Programs of num_warps warps an SM holds at once with regs registers per thread (sm_80 / sm_90: 64K registers
    allocated per warp in units of 256, at most 64 warps and 32 programs; 228 KB of shared memory with 1 KB
    reserved per program)."""
    per_warp = cdiv(max(regs, 1) * 32, 256) * 256
    per_sm = min(65536 // per_warp // num_warps, 64 // num_warps, 32)
    if shared_bytes:
        per_sm = min(per_sm, 233472 // (shared_bytes + 1024))
    return per_sm


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (torch caches the device's properties)."""
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count
