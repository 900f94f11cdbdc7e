"""Speed of the learned methods at given input sizes, all in one process so their ratios are comparable.

Timed calls are *interleaved*: every round times each method once, in the same order, so that a change of machine
load during the study affects every method alike; the median over rounds is reported. Besides whole
registrations the study can time the two encoders on the stacked pair (``encoder:<method>``) and one training
step, forward + backward of the recipe's loss (``train:<method>``). Peak memory is measured separately, one
fresh process per measurement (:func:`~monai_ipear.benchmark.memory.peak_memory_in_fresh_process`). The
arithmetic of each row (:func:`count_gflop`) tells a ratio that follows the work done from one that does not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence

import torch
from monai.transforms import Resize

from ..controllers import FixedIterations
from ..runtime import reduced_precision
from .memory import peak_memory_in_fresh_process

__all__ = ["speed_study", "fixed_at_counts", "count_gflop"]


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def fixed_at_counts(net: torch.nn.Module, counts: Sequence[int]) -> torch.nn.Module:
    """A copy of a pyramid network sharing its weights, with ``FixedIterations(counts[l])`` at level ``l``
    (finest first): the same decoder passes as a controlled run that made ``counts`` updates, without the control."""
    import copy

    clone = copy.copy(net)
    clone._modules = dict(net._modules)
    clone.controller = [FixedIterations(max(1, int(k))) for k in counts]
    return clone


class _Call:
    """A picklable timed call (a fresh process measures its peak memory): ``call(moving, fixed)``."""

    def __init__(self, net: torch.nn.Module, amp: bool, device: torch.device) -> None:
        self.net, self.amp, self.device_type = net, amp, torch.device(device).type

    def __call__(self, a: torch.Tensor, b: torch.Tensor):
        self.net.to(a.device)
        with torch.no_grad(), reduced_precision(self.device_type, self.amp):
            return self.run(a, b)

    def run(self, a, b):
        return self.net.eval()(a, b)


class _EncoderCall(_Call):
    def run(self, a, b):
        return self.net.eval().encoder(torch.cat([a, b], 0))


class _TrainCall(_Call):
    """One training step without the optimiser update: forward (one pass per level) + the recipe's loss + backward."""

    def __call__(self, a, b):
        from ..losses import RegistrationLoss

        net = self.net.to(a.device).train()
        loss_fn = RegistrationLoss(spatial_dims=net.spatial_dims)
        try:
            net.zero_grad(set_to_none=True)
            with reduced_precision(self.device_type, self.amp):
                ddf = net(a, b)
                loss = loss_fn(net.fields.warp(a, ddf), b, ddf)
            loss.backward()
        finally:
            net.eval()
        return ddf.detach()


def count_gflop(call, a: torch.Tensor, b: torch.Tensor) -> float:
    """GFLOP of one ``call(a, b)`` as :class:`torch.utils.flop_counter.FlopCounterMode` counts them: convolutions,
    matrix products and attention (forward and, in a training step, backward; one multiply-add = 2 FLOP).
    Element-wise work, reductions, normalisation and sampling are not counted: the ratio of two rows' GFLOP is
    the arithmetic ratio, which a time ratio above it exceeds in memory-bound passes."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        call(a, b)
    return counter.get_total_flops() / 1e9


def _timed_rounds(entries, mb, fb, repeats, sync, device, times, iterations, outputs) -> None:
    """``repeats`` rounds, each calling every entry once in turn (interleaved), recording times and outputs."""
    for _ in range(repeats):
        for name, net, call in entries:
            sync(device)
            start = time.perf_counter()
            out = call(mb, fb)
            sync(device)
            times[name].append(time.perf_counter() - start)
            iters = getattr(net, "last_iterations", None)
            if ":" not in name:
                iterations[name] = iters.float().mean(0).tolist() if iters is not None else None
                outputs[name] = out


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
    encoders: Sequence[str] = (),
    train_steps: Sequence[str] = (),
    fixed_at_tci: bool = False,
    memory: bool = True,
    train_sizes: Sequence[Sequence[int]] | None = None,
    train_warmup: int = 2,
    flops: bool = False,
    log=print,
) -> list[dict]:
    """Time every network on one real pair resized (trilinear, :class:`monai.transforms.Resize`) to each size.

    Args:
        networks: name -> network (eval mode; iteration controllers active), e.g. iPEAR, RP-Net, IIRP-Net,
            iPEAR fixed-3 sharing trained weights.
        moving, fixed: ``(1, 1, *spatial)`` images in [0, 1] (a real pair, so that iteration counts mean something).
        sizes: spatial sizes to test.
        repeats, warmup: interleaved timed rounds and untimed calls per setting; the median is reported.
        batch_sizes: the pair repeated along the batch (time is per call, not per pair).
        autocast: with ``True`` also under ``torch.autocast`` (float16 on CUDA, bfloat16 on CPU); autocast rows carry
            ``max_abs_diff_voxels``, the largest difference of their field from the float32 field of the same method.
        reference: the method whose time is divided by each other's (``ipear_ratio`` = reference / method); an
            ``encoder:`` or ``train:`` row is divided into the reference's row of the same kind.
        encoders: methods whose encoder alone is also timed on the stacked pair (row ``encoder:<name>``).
        train_steps: methods whose training step (forward + backward of the recipe's loss, one pass per level) is
            also timed (row ``train:<name>``).
        fixed_at_tci: add ``<reference>-fixed-at-tci``: the reference network with, per level, as many fixed updates
            as its controller made in the warm-up call (batch 1: the same decoder passes without the control).
        train_sizes: the sizes at which the training steps are timed (default: every size).
        train_warmup: untimed training steps per method before the training rounds. The training steps are timed
            after the inference rounds, interleaved among themselves only.
        memory: measure each row's peak memory in a fresh process (CPU: peak resident set size of that process,
            ``peak_mb``, and its rise during the call, ``peak_rise_mb``; CUDA: ``torch.cuda.max_memory_allocated``)
            and the call's tensor peak, ``tensor_peak_mb`` (see :mod:`~monai_ipear.benchmark.memory`).
        flops: count each row's arithmetic in one more (untimed) call, ``gflop`` (:func:`count_gflop`), and divide
            it like the times (``ipear_gflop_ratio`` = reference / method).

    Returns:
        rows with ``size``, ``batch``, ``autocast``, ``method``, ``time_s`` (median), ``times_s``, ``peak_mb``,
        ``peak_rise_mb``, ``tensor_peak_mb``, ``iterations`` (mean per level over the batch, finest first), ``ipear_ratio``
        and, with ``flops``, ``gflop`` and ``ipear_gflop_ratio``.
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    rows: list[dict] = []
    for size in sizes:
        resize = Resize(spatial_size=tuple(size), mode="trilinear" if len(size) == 3 else "bilinear")
        m, f = (_plain(resize(x[0].cpu()))[None] for x in (moving, fixed))
        for batch in batch_sizes:
            mb, fb = m.repeat(batch, 1, *([1] * len(size))).to(device), f.repeat(batch, 1, *([1] * len(size))).to(device)
            fp32_fields: dict[str, torch.Tensor] = {}
            for amp in autocast:
                entries: list[tuple[str, torch.nn.Module, _Call]] = []
                for name, net in networks.items():
                    net.to(device).eval()
                    entries.append((name, net, _Call(net, amp, device)))
                for name in encoders:
                    entries.append((f"encoder:{name}", networks[name], _EncoderCall(networks[name], amp, device)))
                train_entries = [
                    (f"train:{name}", networks[name], _TrainCall(networks[name], amp, device))
                    for name in (train_steps if train_sizes is None or list(size) in [list(t) for t in train_sizes] else ())
                ]
                outputs: dict[str, object] = {}
                counts = None
                for _ in range(max(1, warmup)):
                    for name, _net, call in entries:
                        outputs[name] = call(mb, fb)
                        if name == reference and getattr(_net, "last_iterations", None) is not None:
                            counts = _net.last_iterations[0].tolist()
                if fixed_at_tci and counts is not None:
                    name = f"{reference}-fixed-at-tci"
                    clone = fixed_at_counts(networks[reference], counts)
                    call = _Call(clone, amp, device)
                    outputs[name] = call(mb, fb)
                    index = next(i for i, e in enumerate(entries) if e[0] == reference) + 1
                    entries.insert(index, (name, clone, call))
                times: dict[str, list[float]] = {name: [] for name, _, _ in entries + train_entries}
                iterations: dict[str, list | None] = {}
                _timed_rounds(entries, mb, fb, repeats, sync, device, times, iterations, outputs)
                # training steps apart, after their own warm-up: a training run pays the steady state, which the
                # process reaches once its kept heap stops growing (on the development CPU mostly after the second
                # step; the heap still grows now and then later, a slower round that the median absorbs)
                for _ in range(train_warmup):
                    for name, _net, call in train_entries:
                        call(mb, fb)
                _timed_rounds(train_entries, mb, fb, repeats, sync, device, times, iterations, outputs)
                entries += train_entries
                group = []
                for name, net, call in entries:
                    row = {"size": list(size), "batch": batch, "autocast": amp, "method": name,
                           "time_s": statistics.median(times[name]), "times_s": times[name],
                           "peak_mb": float("nan"), "peak_rise_mb": float("nan"), "tensor_peak_mb": float("nan"),
                           "iterations": iterations.get(name)}
                    out = outputs.get(name)
                    if ":" not in name and isinstance(out, torch.Tensor):
                        if not amp:
                            fp32_fields[name] = out.float().cpu()
                        elif name in fp32_fields:
                            row["max_abs_diff_voxels"] = float((out.float().cpu() - fp32_fields[name]).abs().max())
                    if flops:
                        row["gflop"] = count_gflop(call, mb, fb)
                    if memory:
                        mem = peak_memory_in_fresh_process(call, mb, fb, device=device)
                        row.update({k: mem[k] for k in ("peak_mb", "peak_rise_mb", "tensor_peak_mb")})
                    group.append(row)
                    log(f"speed {size} batch {batch} autocast {amp} {name}: {row['time_s']:.3f} s "
                        f"(rounds {[round(t, 2) for t in times[name]]}), peak {row['peak_mb']:.0f} MiB "
                        f"(tensors {row['tensor_peak_mb']:.0f} MiB), "
                        f"iterations {row['iterations']}")
                by_method = {r["method"]: r for r in group}
                for r in group:  # like with like: an encoder row against the reference's encoder, a training step
                    kind = r["method"].split(":")[0] + ":" if ":" in r["method"] else ""
                    ref = by_method.get(kind + reference)
                    r["ipear_ratio"] = ref["time_s"] / r["time_s"] if ref is not None else None
                    if flops:
                        r["ipear_gflop_ratio"] = ref["gflop"] / r["gflop"] if ref is not None and r["gflop"] else None
                rows += group
    return rows
