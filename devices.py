"""
The one device and dtype policy, used by every script (train, sample, serve, bench, eval):

    device='auto'  cuda when there is a GPU, else mps (Apple silicon), else cpu
    dtype='auto'   bfloat16 where the device computes in it (CUDA GPUs since Ampere, MPS on macOS 14+);
                   float16 on other GPUs (train.py then scales the loss with a GradScaler); float32 on CPU

    device, dtype = devices.resolve('auto', 'auto')     # ('cuda:0' | 'mps' | 'cpu', torch.dtype)
    ctx = devices.autocast(device, dtype)               # training: fp32 weights, matmuls in dtype

Also here: the peak FLOP/s of a device, which MFU is measured against.
"""
import functools
import json
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


class DeviceError(ValueError):
    """A device or dtype this machine does not have; the message is one line naming the fix."""


def mps_available():
    return getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()


def auto_device():
    return 'cuda' if torch.cuda.is_available() else 'mps' if mps_available() else 'cpu'


def auto_dtype(device):
    kind = torch.device(device).type
    if kind == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    if kind == 'mps':
        return 'bfloat16' if torch.backends.mps.is_macos_or_newer(14, 0) else 'float16'
    return 'float32'


def resolve(device='auto', dtype='auto'):
    """(device, torch dtype) for the settings a user gave; 'auto' follows the policy above."""
    device = auto_device() if device == 'auto' else device
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise DeviceError(f"device {device!r} is not a device name: use auto, cpu, cuda, cuda:N or mps") from None
    if kind == 'cuda' and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} is not available (no CUDA GPU): use --device=cpu")
    if kind == 'mps' and not mps_available():
        raise DeviceError(f"device {device!r} is not available (no Apple GPU): use --device=cpu")
    dtype = auto_dtype(device) if dtype == 'auto' else dtype
    if dtype not in DTYPES:
        raise DeviceError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return device, DTYPES[dtype]


def autocast(device, dtype):
    """Mixed precision for training: float32 weights, autocast matmuls in dtype; float32 runs as it is."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def synchronize(device):
    kind = torch.device(device).type
    if kind == 'cuda':
        torch.cuda.synchronize(device)
    elif kind == 'mps':
        torch.mps.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# peak FLOP/s of the device in use, for MFU

# dense tensor-core peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name()
GPU_PEAK_FLOPS = {
    "H200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
    "L40S": {torch.bfloat16: 362e12, torch.float16: 362e12, torch.float32: 91.6e12},
    "L4": {torch.bfloat16: 121e12, torch.float16: 121e12, torch.float32: 30.3e12},
    "A10": {torch.bfloat16: 125e12, torch.float16: 125e12, torch.float32: 31.2e12},
    "4090": {torch.bfloat16: 165e12, torch.float16: 165e12, torch.float32: 82.6e12},
    "3090": {torch.bfloat16: 71e12, torch.float16: 71e12, torch.float32: 35.6e12},
    "V100": {torch.float16: 125e12, torch.float32: 15.7e12},
    "T4": {torch.float16: 65e12, torch.float32: 8.1e12},
}


PEAK_CACHE = Path(os.environ.get("NANOFORGE_CACHE", Path.home() / ".cache" / "nanoforge")) / "peak_flops.json"


@functools.lru_cache(maxsize=None)
def peak_flops(device="cpu", dtype=torch.float32):
    """Peak FLOP/s: a table for known GPUs; on CPU (or an unknown GPU) the best matmul rate ever measured on this
    host (CPU model, cores, dtype), kept in PEAK_CACHE: a measurement taken while the host is busy reads low, and
    an MFU against it would read high, so the cache only ever keeps the highest."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_FLOPS.items():
            if key in name and dtype in peaks:
                return peaks[dtype]
    key = f"{host_name(device)} x{torch.get_num_threads()} threads {str(dtype).removeprefix('torch.')}"
    try:
        cache = json.loads(PEAK_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    best = max(measure_matmul_flops(device, dtype), float(cache.get(key, 0.0)))
    if best > cache.get(key, 0.0):
        try:  # a cache: a read-only home only costs the next run a fresh measurement
            PEAK_CACHE.parent.mkdir(parents=True, exist_ok=True)
            tmp = PEAK_CACHE.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**cache, key: best}, indent=1))
            os.replace(tmp, PEAK_CACHE)
        except OSError:
            pass
    return best


def host_name(device):
    """The processor's name: the GPU's, or the CPU model from /proc/cpuinfo (platform's elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_flops(device, dtype, n=1024, reps=20):  # best of 20: a busy machine still shows its peak
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best
