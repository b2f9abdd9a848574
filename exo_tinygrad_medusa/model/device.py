"""Which tinygrad device a model runs on, and one clear error when a device cannot run.

tinygrad's own default is the first device that opens in its list (METAL, AMD, NV, CUDA, QCOM, CL, CPU): an OpenCL
driver alone (Debian's pocl, OpenCL on the very CPU we would run on anyway, with slower kernels and half emulated)
would move every run there. We take the CPU unless a real GPU backend is present, or the user asked for a device
(--device, or tinygrad's DEV variable).
"""
from __future__ import annotations

import functools
import logging
import os
import pkgutil
import shutil

log = logging.getLogger(__name__)

GPU_BACKENDS = ("METAL", "AMD", "NV", "CUDA")  # in tinygrad's order of preference


class DeviceUnavailable(ValueError):
    """The device named cannot run here; the message says why and, where we know, what to install."""


def known_devices() -> list[str]:
    """Device names this tinygrad has a runtime for (its runtime/ops_*.py modules)."""
    import tinygrad.runtime
    return sorted(m.name[len("ops_"):].upper() for m in pkgutil.iter_modules(tinygrad.runtime.__path__)
                  if m.name.startswith("ops_") and m.name not in ("ops_disk", "ops_npy", "ops_tinyfs"))


def _compiler() -> str:
    return os.environ.get("CC", "clang")  # what tinygrad's CPU compiler runs (it reads CC too)


def check_device(device: str) -> str:
    """Open `device` (canonical name returned) or raise DeviceUnavailable with one line saying why."""
    from tinygrad import Device
    name = Device.canonicalize(device)
    base = name.split(":")[0]
    if base not in known_devices():
        raise DeviceUnavailable(f"unknown device {device!r}: tinygrad knows {', '.join(known_devices())}")
    # tinygrad's CPU device compiles its kernels (and a few helpers when it opens) with clang: without it the open
    # fails with "no usable devices", or succeeds from a warm kernel cache and fails at the first new kernel
    if base == "CPU" and shutil.which(_compiler()) is None:
        raise DeviceUnavailable("tinygrad's CPU device needs clang: apt-get install clang" if _compiler() == "clang" else
                                f"tinygrad's CPU device needs a C compiler: CC={_compiler()} is not on PATH")
    try:
        Device[name]
    except Exception as e:  # each backend fails its own way (OSError, AttributeError, ExceptionGroup, ...)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if base == "CL" and "-1001" in reason:  # CL_PLATFORM_NOT_FOUND_KHR: the ICD loader found no driver
            reason = ("no OpenCL platform (install a driver, e.g. apt-get install pocl-opencl-icd, or point "
                      "OCL_ICD_VENDORS at the folder holding its .icd file)")
        raise DeviceUnavailable(f"device {name} cannot run here: {reason}") from e
    return name


@functools.cache
def _gpu_backend() -> tuple[str | None, tuple[str, ...]]:
    """The first GPU backend that opens, and those tried before it (probed once per process: ~2 s without a GPU)."""
    from tinygrad import Device
    missing = []
    for name in GPU_BACKENDS:
        try:
            Device[name]
            return name, tuple(missing)
        except Exception as e:
            log.debug("device %s does not open: %s", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
            missing.append(name)
    return None, tuple(missing)


def choose_device(requested: str | None = None) -> tuple[str, str]:
    """(device, reason): `requested` when given, else tinygrad's DEV variable when set, else the first GPU backend
    (METAL, AMD, NV, CUDA) that opens, else the CPU. The device is opened (DeviceUnavailable if it cannot run) and
    becomes tinygrad's default in this process, so that tensors made without a device land beside the model."""
    from tinygrad.helpers import DEV
    if requested:
        device, reason = check_device(requested), f"--device {requested}"
    elif DEV.device:  # tinygrad's variable as the user set it (tinygrad's own pick goes to os.environ only)
        device, reason = check_device(DEV.device), f"DEV={os.environ.get('DEV', DEV.device)} in the environment"
    else:
        gpu, missing = _gpu_backend()
        if gpu is not None:
            device, reason = gpu, f"{gpu} is present"
        else:
            device = check_device("CPU")
            reason = (f"no GPU backend opened ({', '.join(missing)}); an OpenCL driver alone does not move the run "
                      "(--device CL to use it)")
        os.environ["DEV"] = device  # as tinygrad does with its own pick: spawned compile workers see the same default
    if DEV.device != device.split(":")[0]:  # DEV names a device kind (CPU, CL); a ":suffix" is not part of it
        DEV.value = device.split(":")[0]
    log.info("device %s: %s", device, reason)
    return device, reason
