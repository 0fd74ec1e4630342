"""Prompt logprobs from vLLM's real engine on CPU, one model per process (tests run it as a script).

Usage: python tests/_vllm_logprobs.py MODEL_DIR OUT_JSON TP PP [sharded_state]
OUT_JSON "-": only load the model (every rank's weights), generate nothing.
Always shuts the engine down, so no engine-core or worker process outlives the call.
"""

from __future__ import annotations

import json
import os
import sys

PROMPTS = [[1, 17, 42, 99, 7, 256, 3, 11, 64, 200], [5, 6, 7, 8, 9, 10, 250, 251, 2, 120, 33, 77]]


def main(model: str, out: str, tp: int, pp: int, load_format: str | None) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(os.path.join(model, "config.json")) as fh:
        top = min(512, json.load(fh)["vocab_size"])  # every logprob: vLLM's top-k needs k <= vocab
    kwargs = dict(load_format=load_format) if load_format else {}
    llm = LLM(
        model=model,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        model_impl="transformers",
        dtype="float32",
        enforce_eager=True,
        skip_tokenizer_init=True,
        max_logprobs=top,
        max_model_len=256,
        **kwargs,
    )
    try:
        if out == "-":
            return
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
            SamplingParams(max_tokens=1, prompt_logprobs=top),
        )
        result = [
            [{str(tok): lp.logprob for tok, lp in pos.items()} for pos in o.prompt_logprobs[1:]]
            for o in outputs
        ]
    finally:
        llm.llm_engine.engine_core.shutdown()
    with open(out, "w") as fh:
        json.dump(result, fh)
    # The engine is shut down and the result written. vLLM's CPU build sometimes aborts in the
    # interpreter's teardown after that ("terminate called without an active exception", a C++
    # thread destroyed while joinable: exit -6); what it computed is the result, not that exit
    # (tfbackend's own engine reads scores the same way, parity/engine_vllm.py _wait).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(
        sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
        sys.argv[5] if len(sys.argv) > 5 else None,
    )  # fmt: skip
