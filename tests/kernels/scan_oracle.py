"""The float64 oracle shared by the backend tests: the reference loop and autograd on it."""
import torch

from vim2_kernels.selective_scan.reference import selective_scan_reference

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def run_reference(cfg, inputs, dout, dlast):
    """Reference out, last state and gradients of sum(out * dout) (+ sum(last * dlast))."""
    leaves = {k: (None if v is None else v.detach().clone().requires_grad_()) for k, v in inputs.items()}
    out, last = selective_scan_reference(
        leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"], z=leaves["z"],
        delta_bias=leaves["delta_bias"], delta_softplus=cfg["softplus"], initial_state=leaves["initial_state"],
        reverse=cfg["reverse"], return_last_state=True)
    loss = (out * dout.double()).sum()
    if dlast is not None:
        loss = loss + (last * dlast.double()).sum()
    present = [k for k in GRAD_NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in present])
    return out.detach(), last.detach(), dict(zip(present, grads))
