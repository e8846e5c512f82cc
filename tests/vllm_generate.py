"""Run one model through an in-process vLLM engine and print what it did, as JSON.

`python tests/vllm_generate.py SPEC.json`: SPEC holds `model`, `max_tokens`, optionally
`kv_capacity` (passed to `engine_kwargs`), `dtype` (default float32), `compiled` (vLLM's
compiled mode instead of eager), `engine` (more `LLM` arguments, e.g.
`num_gpu_blocks_override` to force preemptions), and `requests` (a list
of `{"prompt": [token ids], "extra_args": {...}}`, each optionally with its own `max_tokens`,
all submitted together so they share batches). Each request gets a compute_slots row; the
output lists per request its greedy tokens and their log-probabilities, its counters
(compute_slots FIELDS) and, for gated models, the routing decisions the worker took
(`{layer: [0/1 per token]}`); beside them, how many preemptions the engine made. One engine
per process: tests run this as a subprocess, so engines never share a process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["SUBJECTIVE_RECORD_ROUTING"] = "1"


def main(spec_path: str) -> None:
    from vllm import LLM, SamplingParams

    from subjective.model_registry.compute_slots import ENV_VAR, FIELDS, FrontEndSlots
    from subjective.model_registry.vllm_plugin import engine_kwargs
    from subjective.model_registry.vllm_plugin.requests import REGISTRY

    spec = json.loads(Path(spec_path).read_text())
    slots = FrontEndSlots.create(slots=64)
    os.environ[ENV_VAR] = str(slots.path)
    started = time.monotonic()
    llm = LLM(
        **{
            "model": spec["model"],
            "dtype": spec.get("dtype", "float32"),
            "max_model_len": 256,
            "max_num_seqs": 8,
            "max_num_batched_tokens": 64,  # long prompts prefill in chunks, beside decodes
            "distributed_executor_backend": "uni",
            "seed": 0,
            "disable_log_stats": False,  # the preemption counter
            "enforce_eager": not spec.get("compiled", False),
            **engine_kwargs(spec["model"], spec.get("kv_capacity")),
            **spec.get("engine", {}),
        }
    )
    loaded = time.monotonic() - started
    rows = [slots.acquire() for _ in spec["requests"]]
    params = [
        SamplingParams(
            max_tokens=r.get("max_tokens", spec["max_tokens"]),
            temperature=0.0,
            ignore_eos=True,
            logprobs=0,  # the chosen token's log-probability
            extra_args={**r["extra_args"], "meter_slot": slot, "meter_tag": tag},
        )
        for r, (slot, tag) in zip(spec["requests"], rows, strict=True)
    ]
    prompts = [{"prompt_token_ids": r["prompt"]} for r in spec["requests"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    results = []
    for output, (slot, tag) in zip(outputs, rows, strict=True):
        state = REGISTRY.recorded.get(tag)
        routing = {}
        if state is not None:
            routing = {str(layer): mask.int().tolist() for layer, mask in state.routing.items()}
        sample = output.outputs[0]
        steps = zip(sample.logprobs, sample.token_ids, strict=True)
        chosen = [step[token].logprob for step, token in steps]
        results.append(
            {
                "tokens": list(sample.token_ids),
                "logprobs": chosen,
                "counts": dict(zip(FIELDS, (int(v) for v in slots.rows[slot, 1:]), strict=True)),
                "routing": routing,
            }
        )
    preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    print(json.dumps({"load_s": loaded, "preemptions": preemptions, "results": results}))
    slots.close()


if __name__ == "__main__":
    main(sys.argv[1])
