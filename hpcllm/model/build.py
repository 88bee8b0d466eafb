"""Architecture registry: checkpoint -> model module on this tp rank."""

import torch

from hpcllm.errors import HpcllmError
from hpcllm.model.parallel import load_state
from hpcllm.model.partition import partition_for


def architecture(name: str):
    """-> (model class, split plan) of an architecture name."""
    if name == "bert":
        from hpcllm.model import encoder

        return encoder.Encoder, encoder.PLAN
    if name == "llama":
        from hpcllm.model import decoder

        return decoder.Decoder, decoder.PLAN
    raise HpcllmError(f"unknown architecture {name!r}")


def plan_for(name: str) -> dict:
    return architecture(name)[1]


def build_model(ckpt, tp_rank: int, tp_size: int, comm, dtype=torch.float32):
    """Model with only this rank's hyperslabs of the weights, in ``dtype``."""
    cls, plan = architecture(ckpt.architecture)
    part = partition_for(ckpt.config, tp_rank, tp_size)
    with torch.device("meta"):
        model = cls(ckpt.config, part, comm)
    load_state(model, ckpt.read, plan, part, dtype)
    if hasattr(model, "fuse"):
        model.fuse()  # e.g. Q|K|V into one matmul, once the per-tensor hyperslabs are loaded
    return model.eval()
