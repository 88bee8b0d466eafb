"""Checkpoint -> model module on this tp rank: the plain model, cut by its plan, loaded, fused."""

import torch

from hpcllm.model.quant import check_runnable
from hpcllm.model.architectures import architecture
from hpcllm.model.parallel import load_state, parallelize
from hpcllm.model.partition import partition_for


def build_model(ckpt, tp_rank: int, tp_size: int, comm, dtype=torch.float32, device="cpu",
                pack: bool = True):
    """Model with only this rank's hyperslabs of the weights, in ``dtype``, on ``device``; ``pack=False``
    keeps plain dense weights (training needs them: a packed weight has no gradient)."""
    check_runnable(getattr(ckpt, "weights", "float"), torch.device(device).type, ckpt.path)
    arch = architecture(ckpt.architecture)
    partition = partition_for(ckpt.config, tp_rank, tp_size)
    with torch.device("meta"):  # full-size plain modules cost nothing here; parallelize cuts them
        model = parallelize(arch.model_class()(ckpt.config), arch.plan, partition, comm)
    load_state(model, ckpt, arch.plan, partition, dtype)
    if hasattr(model, "fuse"):
        model.fuse()  # e.g. Q|K|V into one matmul, once the per-tensor hyperslabs are loaded
    model = model.to(device)
    if pack and hasattr(model, "pack"):
        model.pack()  # weights in the layout the device's matmul wants (oneDNN tensors: not movable)
    return model.eval()
