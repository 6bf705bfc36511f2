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
    """Streaming multiprocessors of a CUDA device (an index, a name or a torch.device; no index: the current one).
    Looked up once per device: ``torch.cuda.get_device_properties`` costs ~5 us a call on the H200's host, and the
    launchers' plans ask for it several times a launch."""
    import torch

    device = device if isinstance(device, torch.device) else torch.device("cuda", device) \
        if isinstance(device, int) else torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _SMS.get(index)
    if count is None:
        count = _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


_SMS = {}
