"""A watch for host reads on device paths (issue 13): shared by the method packages' tests.

:class:`HostReads` watches every aten op run under it: an op that must read device memory on the host
(``.item()``, ``int(t)``, ``bool(t)``: ``_local_scalar_dense``; ``is_nonzero``; ``nonzero``, ``unique``,
``masked_select``, ``bincount``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``:
data-dependent shapes), a copy to another device, or a result of one or more dimensions on another device is
recorded in ``found``. :func:`run_watched` also makes ``.tolist()`` / ``.numpy()`` (which read memory without an op)
raise. On CPU tensors it stands in for CUDA (where each of these is a synchronisation); with CUDA, run the same
path under ``torch.cuda.set_sync_debug_mode("error")`` too (:func:`sync_debug_errors`), which raises on any
synchronisation. First written for knn (tests/knn_attention/test_no_host_sync.py), moved here for tree.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
HOST_READ_OPS = {aten._local_scalar_dense, aten.is_nonzero, aten.nonzero, aten.unique_dim, aten._unique,
                 aten._unique2, aten.unique_consecutive, aten.masked_select, aten.bincount}


class HostReads(TorchDispatchMode):
    """Records every host read / device change of the ops run under it (module docstring) in ``self.found``."""

    def __init__(self, device):
        super().__init__()
        self.device, self.found = torch.device(device), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        flat = [a for a in args if isinstance(a, torch.Tensor)] + [
            t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        if func in HOST_READ_OPS or packet in HOST_READ_OPS:
            self.found.append(str(func))
        if packet in (aten.index, aten.index_put, aten.index_put_) and any(
                t.dtype == torch.bool for a in args if isinstance(a, (list, tuple)) for t in a
                if isinstance(t, torch.Tensor)):
            self.found.append(f"{func} with a boolean mask")
        if packet == aten.repeat_interleave and "output_size" not in kwargs and func != aten.repeat_interleave.self_int:
            self.found.append(f"{func} without output_size")
        if packet in (aten._to_copy, aten.copy_) and any(t.device != self.device for t in flat):
            self.found.append(f"{func} from another device")
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (list, tuple)) else [out]
        for t in outs:
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.device != self.device:
                self.found.append(f"{func} returned a tensor on {t.device}")
        return out


def _no_memory_reads(monkeypatch):
    for name in ("tolist", "numpy", "__array__"):
        def refuse(self, *a, name=name, **k):
            raise AssertionError(f"Tensor.{name} read device memory on the host")
        monkeypatch.setattr(torch.Tensor, name, refuse)


def run_watched(fn, device, monkeypatch):
    """fn() under :class:`HostReads` with ``.tolist()`` / ``.numpy()`` refused; returns (result, what it found)."""
    with monkeypatch.context() as m:
        _no_memory_reads(m)
        with HostReads(device) as watch:
            result = fn()
    return result, watch.found


@contextlib.contextmanager
def sync_debug_errors():
    """CUDA: any synchronisation inside raises (``torch.cuda.set_sync_debug_mode('error')``), reset on exit.
    Warm the path up first: lazy CUDA initialisation may synchronise once."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
