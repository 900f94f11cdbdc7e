"""Speed of the learned methods at given input sizes, all in one process so their ratios are comparable."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch
from monai.transforms import Resize

from .harness import time_call

__all__ = ["speed_study"]


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def speed_study(
    networks: Mapping[str, torch.nn.Module],
    moving: torch.Tensor,
    fixed: torch.Tensor,
    sizes: Sequence[Sequence[int]],
    repeats: int = 3,
    warmup: int = 1,
    batch_sizes: Sequence[int] = (1,),
    autocast: Sequence[bool] = (False,),
    device: torch.device | str = "cpu",
    reference: str = "ipear",
    log=print,
) -> list[dict]:
    """Time every network on one real pair resized (trilinear, :class:`monai.transforms.Resize`) to each size.

    Args:
        networks: name -> network (eval mode; iteration controllers active), e.g. iPEAR, RP-Net, IIRP-Net,
            iPEAR fixed-3 sharing trained weights.
        moving, fixed: ``(1, 1, *spatial)`` images in [0, 1] (a real pair, so that iteration counts mean something).
        sizes: spatial sizes to test.
        repeats, warmup: timed and untimed calls per setting; the median is reported.
        batch_sizes: the pair repeated along the batch (time is per call, not per pair).
        autocast: with ``True`` also under ``torch.autocast`` (float16 on CUDA, bfloat16 on CPU).
        reference: the method whose time is divided by each other's (``ipear_ratio`` = reference / method).

    Returns:
        rows with ``size``, ``batch``, ``autocast``, ``method``, ``time_s`` (median), ``times_s``, ``peak_mb``,
        ``iterations`` (mean per level over the batch, finest first) and ``ipear_ratio``.
    """
    device = torch.device(device)
    rows: list[dict] = []
    for size in sizes:
        resize = Resize(spatial_size=tuple(size), mode="trilinear" if len(size) == 3 else "bilinear")
        m, f = (_plain(resize(x[0].cpu()))[None] for x in (moving, fixed))
        for batch in batch_sizes:
            mb, fb = m.repeat(batch, 1, *([1] * len(size))).to(device), f.repeat(batch, 1, *([1] * len(size))).to(device)
            for amp in autocast:
                group = []
                for name, net in networks.items():
                    net = net.to(device).eval()
                    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

                    def call(a, b, net=net, amp=amp, dtype=dtype):
                        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=amp):
                            return net(a, b)

                    _, times, peak = time_call(call, mb, fb, repeats=repeats, warmup=warmup, device=device)
                    iters = getattr(net, "last_iterations", None)
                    row = {"size": list(size), "batch": batch, "autocast": amp, "method": name,
                           "time_s": statistics.median(times), "times_s": times, "peak_mb": peak,
                           "iterations": iters.float().mean(0).tolist() if iters is not None else None}
                    group.append(row)
                    log(f"speed {size} batch {batch} autocast {amp} {name}: {row['time_s']:.3f} s, "
                        f"iterations {row['iterations']}")
                ref = next((r for r in group if r["method"] == reference), None)
                for r in group:
                    r["ipear_ratio"] = ref["time_s"] / r["time_s"] if ref is not None else None
                rows += group
    return rows
