"""`--engine vllm`: vLLM's own Transformers backend, compared with the same reference.

Thin on purpose: vLLM builds, shards and runs the model; we only ask for prompt logprobs and
compare them by top-k containment and logprob differences (vLLM returns the top-k only, so there
is no KL or logit difference). Not exercised on the machines this project was built on (the GPU
hosts have no vLLM); see docs/run.md.
"""

from __future__ import annotations

import time

from tfbackend.errors import UserError
from tfbackend.parity.metrics import TOP_K, compare_topk_logprobs


def run_vllm(local_dir, prompts, reference, options, report, progress):
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as exc:
        raise UserError("--engine vllm needs vLLM: pip install 'tfbackend[vllm]'") from exc
    from tfbackend.parity.verdict import judge, thresholds_for

    t = time.perf_counter()
    progress("spawn ranks", "running", "vLLM LLM(model_impl='transformers')")
    llm = LLM(
        model=local_dir,
        model_impl="transformers",
        tensor_parallel_size=options.tp,
        pipeline_parallel_size=options.pp,
        enforce_eager=True,
        dtype=options.dtype,
        device=options.device,
        trust_remote_code=options.trust_remote_code,
    )
    progress("spawn ranks", "done", "")
    progress("forward", "running", "")
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=p.ids) for p in prompts],
        SamplingParams(max_tokens=1, prompt_logprobs=TOP_K),
    )
    report.phases["vllm"] = time.perf_counter() - t
    progress("forward", "done", "")
    th = thresholds_for(options.dtype)
    report.thresholds = {**th.__dict__, "note": "KL not available from top-k logprobs"}
    for prompt, ref, out in zip(prompts, reference.logits, outputs, strict=True):
        # prompt_logprobs[i] is the distribution over token i given tokens < i: reference row i-1.
        topk = [{tok: lp.logprob for tok, lp in d.items()} for d in out.prompt_logprobs[1:]]
        m = compare_topk_logprobs(prompt.name, ref[:-1], topk)
        report.prompts.append(m)
        why = judge(m, th)
        if why:
            report.failures[prompt.name] = why
    report.verdict = "fail" if report.failures else "pass"
    report.notes.append("engine vllm: compared on vLLM's top-k prompt logprobs only")
    return report
