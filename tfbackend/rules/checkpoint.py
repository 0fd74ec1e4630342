"""TFB70x: will the checkpoint's tensors load into the wrapped model? (headers only)"""

from __future__ import annotations

from tfbackend.inspect.checkpoint import FORMAT_PICKLE, FORMAT_UNAVAILABLE
from tfbackend.rules.findings import Severity
from tfbackend.rules.registry import rule

SHOWN = 5  # names listed in a finding's message; the full list is in its data


def _comparison(ctx):
    cmp = ctx.options.get("checkpoint")
    return cmp if cmp is not None and cmp.compared else None


def _listed(names: list[str]) -> str:
    more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


@rule(
    "TFB701",
    "Checkpoint lacks tensors the model needs",
    Severity.ERROR,
    rationale="""
vLLM's default loader compares the parameters it loaded with the model's and raises
`ValueError: Following weights were not initialized from checkpoint` for any left out. Names are
compared after the backend's own mapping (transformers renames, base-model prefix, per-expert
tensors merged into 3-D experts, a tied lm_head taken from the embedding). vLLM 0.32 applies the
model's `_keys_to_ignore_on_load_unexpected` patterns with `re.search` to every key, not only to
unexpected ones, so a pattern such as GPT-2's `attn.bias` also drops the real `c_attn.bias`.
""",
    fix="use the checkpoint that matches this config (architecture, layer count, tie_word_embeddings)",
)
def missing_tensors(ctx, r):
    cmp = _comparison(ctx)
    if not cmp or not cmp.missing:
        return
    absent = [m for m in cmp.missing if m not in cmp.dropped_but_needed]
    if absent:
        yield r.finding(
            f"{len(absent)} parameter(s) not in the checkpoint: {_listed(absent)}",
            modules=absent[:SHOWN],
            missing=absent,
        )
    dropped = list(cmp.dropped_but_needed)
    if dropped:
        reasons = sorted(set(cmp.dropped_but_needed.values()))
        yield r.finding(
            f"{len(dropped)} parameter(s) in the checkpoint but dropped by the backend's loader "
            f"({'; '.join(reasons)}), so never loaded: {_listed(dropped)}",
            fix="vLLM applies _keys_to_ignore_on_load_unexpected to every key: report it to vLLM, "
            "or run the model with vLLM's native implementation",
            modules=dropped[:SHOWN],
            missing=dropped,
        )


@rule(
    "TFB702",
    "Checkpoint holds tensors the model does not have",
    Severity.ERROR,
    rationale="""
The backend's AutoWeightsLoader raises `ValueError: There is no module or parameter named …` for a
checkpoint tensor that maps onto nothing, unless it is ignored on purpose (a tied lm_head, rotary
caches, `_keys_to_ignore_on_load_unexpected`, unexpected biases, MTP layers past
num_hidden_layers).
""",
    fix="remove the extra tensors from the checkpoint, or fix the config so the model has them",
)
def unexpected_tensors(ctx, r):
    cmp = _comparison(ctx)
    if cmp and cmp.unexpected:
        yield r.finding(
            f"{len(cmp.unexpected)} checkpoint tensor(s) map onto no parameter: "
            f"{_listed(cmp.unexpected)}",
            unexpected=cmp.unexpected,
        )


@rule(
    "TFB703",
    "Checkpoint tensor shape differs from the model's",
    Severity.ERROR,
    rationale="""
Each checkpoint tensor is compared with the full (unsharded) parameter shape, or with one expert's
slice of a 3-D experts parameter. vLLM's weight loaders assert on the shape of what they copy.
""",
    fix="the config and the checkpoint disagree (hidden size, heads, vocab, experts): match them",
)
def shape_mismatches(ctx, r):
    cmp = _comparison(ctx)
    if not cmp or not cmp.shape_mismatches:
        return
    shown = [
        f"{m.checkpoint_name} {m.checkpoint_shape} (model expects {m.expected_shape})"
        for m in cmp.shape_mismatches
    ]
    yield r.finding(
        f"{len(shown)} tensor(s) with the wrong shape: {_listed(shown)}",
        modules=[m.target for m in cmp.shape_mismatches[:SHOWN]],
        mismatches=[
            {"name": m.checkpoint_name, "shape": m.checkpoint_shape, "expected": m.expected_shape}
            for m in cmp.shape_mismatches
        ],
    )


@rule(
    "TFB704",
    "Checkpoint dtype differs from the served dtype",
    Severity.WARNING,
    rationale="""
The loader casts every tensor to the served dtype. float32 weights served in bfloat16/float16 lose
precision (vLLM downcasts float32 configs by default); bfloat16 weights served in float16 can
overflow; half-precision weights served in float32 double the memory for no accuracy. A config
`dtype` that disagrees with the tensors is a sign the checkpoint was saved differently than
described.
""",
    fix="pass --dtype to match the checkpoint, or re-save the checkpoint in the dtype you serve",
)
def dtype_surprise(ctx, r):
    cmp = _comparison(ctx)
    if not cmp or not cmp.checkpoint_dtype:
        return
    ckpt, served, cfg = cmp.checkpoint_dtype, cmp.served_dtype, cmp.config_dtype
    if ckpt != served:
        half = ("bfloat16", "float16")
        if ckpt == "float32" and served in half:
            sev, why = Severity.WARNING, "precision is lost in the cast"
        elif ckpt in half and served in half:
            sev = Severity.WARNING
            why = "bfloat16 values beyond ±65504 overflow" if ckpt == "bfloat16" else "precision"
        else:
            sev, why = Severity.INFO, "weights take more memory than stored"
        yield r.finding(
            f"checkpoint tensors are {ckpt}, served as {served}: {why}",
            severity=sev,
            checkpoint_dtype=ckpt,
            served_dtype=served,
        )
    if cfg and cfg != ckpt:
        yield r.finding(
            f"config dtype is {cfg} but the checkpoint's tensors are mostly {ckpt}",
            severity=Severity.INFO,
            checkpoint_dtype=ckpt,
            config_dtype=cfg,
        )


@rule(
    "TFB705",
    "Checkpoint is pickle only (.bin)",
    Severity.WARNING,
    rationale="""
A `.bin`/`.pt` checkpoint is a pickle: loading it can run arbitrary code, it loads slower than
safetensors, and its tensor names and shapes cannot be checked without unpickling it, which
tfbackend never does.
""",
    fix="convert it to safetensors (e.g. the hub's convert space, or load with "
    "torch.load(weights_only=True) and save_pretrained(safe_serialization=True))",
)
def pickle_only(ctx, r):
    cmp = ctx.options.get("checkpoint")
    if cmp is not None and cmp.headers.format == FORMAT_PICKLE:
        yield r.finding(
            f"only pickle weights ({_listed(cmp.headers.pickle_files)}): not opened, not checked",
            files=cmp.headers.pickle_files,
        )


@rule(
    "TFB706",
    "Checkpoint headers could not be read",
    Severity.WARNING,
    rationale="""
Offline without the checkpoint's files in the hub cache, or with the hub unreachable, the tensor
names, shapes and dtypes cannot be compared with the model: the load is not checked.
""",
    fix="go online (headers are read by range requests, no weights are downloaded), or "
    "pass --no-checkpoint",
)
def headers_unavailable(ctx, r):
    cmp = ctx.options.get("checkpoint")
    if cmp is not None and cmp.headers.format == FORMAT_UNAVAILABLE:
        yield r.finding(
            f"checkpoint of {cmp.headers.location} not checked: {cmp.headers.unavailable_reason}"
        )


@rule(
    "TFB707",
    "Checkpoint tensors the loader ignores",
    Severity.INFO,
    rationale="""
Some tensors are dropped on purpose: a tied lm_head (the embedding is used), rotary caches,
`_keys_to_ignore_on_load_unexpected`, unexpected biases (GPTQ), MTP layers past
num_hidden_layers. Listed so a surprise (e.g. a real bias being ignored) is visible.
""",
    fix="nothing to do unless a listed tensor should have been loaded",
)
def ignored_tensors(ctx, r):
    cmp = _comparison(ctx)
    if not cmp or not cmp.ignored:
        return
    reasons: dict[str, list[str]] = {}
    for m in cmp.ignored:
        reasons.setdefault(m.reason, []).append(m.checkpoint_name)
    for reason, names in reasons.items():
        yield r.finding(f"{len(names)} ignored ({reason}): {_listed(names)}", ignored=names)
