"""Numeric precision for training and prediction: which one `auto` means on this machine, and its autocast.

auto: on CUDA, bf16 where the GPU supports it, else fp16 (fastai's MixedPrecision adds loss scaling); on a CPU,
bf16 autocast only where it runs this backbone faster than fp32. Whether it does depends on the CPU and on
the network: on our Xeons (AMX) bf16 doubles ResNet training at 224 px, yet slows the depthwise convolutions
of EfficientNet-Lite training at 64 px (bench/BENCHMARKS.md). So the probe times the real architecture at the
real size, a few steps each way, once per process (cached).
"""
from __future__ import annotations

import functools
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .backbones import create_backbone, get_spec
from .errors import ItfitsError, ItfitsWarning, did_you_mean

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BF16_MARGIN = 0.9  # bf16 must take under 90% of fp32's time: near a tie, fp32 (exact) wins


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16: what runs
    requested: str  # what the user asked for (auto, ...)
    device: str  # "cpu" or "cuda"
    reason: str  # one line for the log and run.json

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES.get(self.name)

    def autocast(self):
        """torch.autocast for this precision on its device, or a no-op for fp32. Outputs may be 16-bit."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device, dtype=self.dtype)

    def json(self) -> dict:
        return {"precision": self.name, "requested": self.requested, "device": self.device, "reason": self.reason}

    def line(self, *, timings: bool = False) -> str:
        """`precision fp32 (CPU probe: the faster on this CPU)`; `timings` (--verbose): the probe's step times, as
        run.json's reason holds them."""
        probed = self.reason.startswith(PROBE) and not timings
        return f"precision {self.name} ({f'{PROBE}: the faster on this CPU' if probed else self.reason})"


PROBE = "CPU probe"  # how a reason from cpu_step_times starts


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ItfitsError(f"'{name}' is not a precision;{did_you_mean(name, PRECISIONS)} "
                          f"choices: {', '.join(PRECISIONS)}")
    return name


def resolve_precision(requested: str, *, arch: str, size: int, train: bool = True,
                      device: torch.device | str | None = None) -> Precision:
    """What `requested` (auto|fp32|bf16|fp16) means for backbone `arch` at `size` px on `device` (default: CUDA if
    there is one). fp16 on a CPU, or bf16 on a GPU without it, falls back with a warning, never an error."""
    check_precision(requested)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")).type
    if requested == "fp32":
        return Precision("fp32", requested, dev, "asked for")
    if dev == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)  # T4, V100: emulated, slow; fp16 there
        if requested == "auto":
            return Precision("bf16" if bf16_ok else "fp16", requested, dev,
                             "the GPU supports bf16" if bf16_ok else "the GPU lacks bf16: fp16 with loss scaling")
        if requested == "bf16" and not bf16_ok:
            warnings.warn("--precision bf16: this GPU does not support bf16; using fp16 with loss scaling",
                          ItfitsWarning, stacklevel=2)
            return Precision("fp16", requested, dev, "bf16 unsupported on this GPU")
        return Precision(requested, requested, dev, "asked for")
    if dev != "cpu":  # mps and others: autocast support varies, fp32 always works
        return Precision("fp32", requested, dev, f"16-bit autocast is not set up for {dev}")
    if requested == "bf16":
        return Precision("bf16", requested, dev, "asked for")
    if requested == "fp16":
        warnings.warn("--precision fp16 needs a GPU; on this CPU using the auto choice instead "
                      "(bf16 where it is faster, else fp32)", ItfitsWarning, stacklevel=2)
    t32, t16 = cpu_step_times(arch, size, train=train)
    faster = t16 < BF16_MARGIN * t32
    return Precision("bf16" if faster else "fp32", requested, dev,
                     f"{PROBE}, {'training' if train else 'inference'} step at {size}px: bf16 {t16 * 1e3:.0f} ms "
                     f"vs fp32 {t32 * 1e3:.0f} ms")


@functools.cache
def cpu_has_bf16() -> bool | None:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX-BF16), from /proc/cpuinfo; None where that file
    does not say (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags))


def prediction_precision(trained: str, *, arch: str, size: int, device: torch.device | str) -> Precision:
    """`auto` at prediction: the precision the model was trained and calibrated in, where this machine has it in
    hardware, else fp32. Not timed: a probe's answer moves with the machine's load, and two predictions of one
    model then flagged different files (a bf16 and an fp32 pass differ by more than the threshold's margin)."""
    dev = torch.device(device).type
    if trained == "fp32" or dev != "cpu":  # GPUs: the training's rules (native bf16, else fp16)
        return (Precision("fp32", "auto", dev, "the model was trained and calibrated in fp32") if trained == "fp32"
                else resolve_precision("auto", arch=arch, size=size, train=False, device=device))
    native = cpu_has_bf16()
    if native is None:  # no flags to read: time it
        return resolve_precision("auto", arch=arch, size=size, train=False, device=device)
    return (Precision("bf16", "auto", dev, "the model was trained and calibrated in bf16; this CPU has bf16 "
                      "instructions") if native else
            Precision("fp32", "auto", dev, "this CPU has no bf16 instructions (emulated bf16 is slower than fp32)"))


@functools.cache
def cpu_step_times(arch: str, size: int, *, train: bool, batch: int = 8, rounds: int = 2) -> tuple[float, float]:
    """(fp32 seconds, bf16 seconds) of one step of `arch` on a CPU: the faster of `rounds` tries each, the
    two precisions alternating so background load hits both alike. About 0.3-1 s for the registry's models."""
    with torch.random.fork_rng():  # the probe must not move the seeded RNG of the run
        torch.manual_seed(0)
        model = create_backbone(arch, num_classes=2, weights="none").train(train)
        x = torch.randn(batch if size <= 128 else max(2, batch // 4), 3, size, size)
        if get_spec(arch).channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

        def step(dtype):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                if not train:
                    with torch.inference_mode():
                        return model(x)
                out = model(x)
            out.float().sum().backward()

        best = {None: float("inf"), torch.bfloat16: float("inf")}
        for i in range(rounds + 1):  # round 0 warms up (oneDNN builds its kernels on first use)
            for dtype in best:
                t = time.perf_counter()
                step(dtype)
                if i:
                    best[dtype] = min(best[dtype], time.perf_counter() - t)
    return best[None], best[torch.bfloat16]
