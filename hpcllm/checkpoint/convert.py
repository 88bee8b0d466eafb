"""`hpcllm convert SRC DST`: an HF model directory or a GGUF file -> HDF5 checkpoint.

Which importer reads a source comes from the architecture registry
(``hpcllm.model.architectures``): a ``.gguf`` file by its ``general.architecture``,
an HF directory by its config.json ``model_type``.

Under ``mpiexec -n K`` (K > 1) every rank imports the source and writes its
slabs of the tensors in parallel: a sharded checkpoint (one file per rank plus
a master joining them with virtual datasets, ``hpcllm.checkpoint.sharded``)
that reads, and loads at any tp, like a single file and has the same content
hash.  The importers still read whole sources on each rank; making them read
only a rank's tensors is what would split the dequantising work of a large GGUF.
"""

import json
import os

from hpcllm.checkpoint.hdf5 import write_checkpoint
from hpcllm.model.quant import quantize_tensors
from hpcllm.errors import HpcllmError
from hpcllm.model.architectures import architecture, hf_importer, plan_for
from hpcllm.world.launch import launched_world


def import_source(src: str):
    """-> (architecture, config, tensors, tokenizer_json) from any supported source."""
    if not os.path.exists(src):
        raise HpcllmError(f"convert: source not found: {src}")
    if src.endswith(".gguf"):
        from hpcllm.checkpoint.gguf import import_gguf

        return import_gguf(src)
    cfg_path = os.path.join(src, "config.json")
    if not os.path.isdir(src) or not os.path.exists(cfg_path):
        raise HpcllmError(f"convert: {src} is neither a .gguf file nor a model directory with config.json")
    with open(cfg_path) as f:
        model_type = json.load(f).get("model_type")
    return hf_importer(model_type, f"convert: {cfg_path}")(src)


def convert(src: str, dst: str, dtype: str = "float32", comm=None, weights: str = "float") -> str:
    """Convert ``src`` into ``dst``; returns the content hash.  ``comm`` (default: the MPI world when
    launched by mpiexec with several ranks): write a sharded checkpoint, one file per rank.
    ``weights`` "int8": the linear weights quantised per output channel (``hpcllm.model.quant``)."""
    comm = comm if comm is not None else launched_world()
    arch, config, tensors, tokenizer_json = import_source(src)
    tensors = quantize_tensors(tensors, plan_for(arch), weights, architecture(arch).family)
    return write_checkpoint(dst, arch, config, tensors, tokenizer_json, source=os.path.abspath(src),
                            plan=plan_for(arch), dtype=dtype, comm=comm, weights=weights)

