"""The parts of `--engine vllm` that need no vLLM: finding it, reading what it raised, planning
its processes and its requests."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib.metadata import version

import pytest

from tfbackend.env import vllm_distribution
from tfbackend.inspect.walk import versions
from tfbackend.parity.engine_vllm import FULL_SCORES_LIMIT, _batches, executor_for
from tfbackend.parity.vllm_child import describe, one_line, phase_of, worker_failure
from tfbackend.vllm_bridge.run import vllm_version


def test_vllm_is_found_by_its_importable_package_whatever_its_distribution():
    found = vllm_distribution()
    assert (found is None) == (importlib.util.find_spec("vllm") is None)
    if found is not None:
        assert found[1] is None or version(found[0]) == found[1]
        assert versions()["vllm"] == found[1]
        assert vllm_version() == (found[1] or "unknown")  # what --with-vllm asks
    else:
        assert vllm_version() is None


def test_finding_vllm_does_not_import_it():
    # Read from metadata: importing vLLM starts its platform detection and costs seconds.
    code = (
        "import sys; from tfbackend.env import vllm_distribution; "
        "vllm_distribution(); print('vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _raise_from(path: str, function: str, statement: str) -> BaseException:
    """An exception raised by `statement` inside `function`, as if defined in vLLM's `path`."""
    namespace: dict = {}
    exec(compile(f"def {function}():\n    {statement}\n", path, "exec"), namespace)
    try:
        namespace[function]()
    except BaseException as exc:  # noqa: BLE001 - the exception is the test's subject
        return exc
    raise AssertionError("did not raise")


@pytest.mark.parametrize(
    "function,phase",
    [
        ("create_engine_config", "config validation"),
        ("initialize_model", "construction"),
        ("load_weights", "weight loading"),
        ("initialize_kv_cache", "KV cache setup"),
        ("execute_model", "forward"),
    ],
)
def test_the_phase_is_where_vllm_raised(function, phase):
    exc = _raise_from("/site-packages/vllm/somewhere.py", function, "raise ValueError('x')")
    assert phase_of(exc, "engine") == phase


def test_outside_known_frames_the_phase_is_the_step_reached():
    exc = _raise_from("/elsewhere/mod.py", "initialize_model", "raise ValueError('x')")
    assert phase_of(exc, "engine") == "construction"
    assert phase_of(exc, "generate") == "forward"


def test_vllms_message_is_one_line_and_a_bare_assert_names_its_statement(tmp_path):
    exc = _raise_from("/x/vllm/runner.py", "f", "raise ValueError('bad\\n   shape   [3]')")
    assert one_line(exc) == "bad shape [3]"
    source = tmp_path / "model_runner.py"  # a real file: the failing statement is read back
    source.write_text("def f():\n    tensors = None\n    assert tensors is not None\n")
    namespace: dict = {}
    exec(compile(source.read_text(), str(source), "exec"), namespace)
    with pytest.raises(AssertionError) as info:
        namespace["f"]()
    assert one_line(info.value) == "assert tensors is not None (model_runner.py:3)"


def test_a_validators_error_is_unwrapped_from_pydantic():
    # vLLM's configs are pydantic dataclasses: a ValueError from a validator arrives wrapped.
    pydantic = pytest.importorskip("pydantic")

    class ParallelConfig(pydantic.BaseModel):
        tensor_parallel_size: int

        @pydantic.field_validator("tensor_parallel_size")
        @classmethod
        def divides(cls, tp):
            raise ValueError(f"Total number of attention heads (3) must be divisible by {tp}.")

    with pytest.raises(pydantic.ValidationError) as info:
        ParallelConfig(tensor_parallel_size=2)
    assert describe(info.value) == (
        "ValueError",
        "Total number of attention heads (3) must be divisible by 2.",
    )


def test_a_worker_that_failed_to_start_is_read_from_its_logged_traceback():
    prefix = "(Worker_PP1 pid=32526) ERROR 12-01 21:28:20 [multiproc_executor.py:953] "
    log = "\n".join(
        prefix + line
        for line in (
            "WorkerProc failed to start.",
            "Traceback (most recent call last):",
            '  File "/v/vllm/model_executor/model_loader/utils.py", line 74, in initialize_model',
            "    model = model_class(vllm_config=vllm_config, prefix=prefix)",
            "ValueError: 3 layers do not split over 2 stages",
        )
    )
    assert worker_failure("INFO unrelated\n" + log) == (
        "ValueError",
        "3 layers do not split over 2 stages",
        "construction",
    )
    assert worker_failure("no traceback here") is None


def test_executor_per_layout():
    assert executor_for(1, 1) == "uni"  # the whole engine in one process
    assert executor_for(2, 1) == "external_launcher"  # one process per rank
    assert executor_for(1, 2) == "mp"  # pipeline: vLLM's own workers
    assert executor_for(2, 2) == "mp"


def test_full_scores_are_asked_in_batches_under_the_limit():
    vocab = 1 << 17
    per_prompt = FULL_SCORES_LIMIT // vocab  # tokens one batch can hold
    batches = _batches([per_prompt, 1, per_prompt - 1, 5], vocab)
    assert batches == [[0], [1, 2], [3]]
    assert _batches([7, 19, 40], 0) == [[0, 1, 2]]  # top-k: everything at once
