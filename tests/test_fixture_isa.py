"""The tests whose results depend on the instruction set refuse to run where it is not theirs, saying how to run them:
the bf16 fixture tests and the fixture maker unless oneDNN is capped to BF16_FIXTURE_ISA, the committed random draws
under ATen's scalar kernels, torch.compile under a forced ATEN_CPU_CAPABILITY."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.official_fixtures import BF16_FIXTURE_ISA

ROOT = Path(__file__).resolve().parent.parent
BF16_FIXTURE_TEST = "tests/test_precision.py::test_official_regime_forward_matches_the_official_code_in_its_regime"


def run(arguments, isa, **forced):
    """`python arguments` with ONEDNN_MAX_CPU_ISA=isa (unset for None), ATEN_CPU_CAPABILITY unset unless forced."""
    env = {key: value for key, value in os.environ.items() if key not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    if isa is not None:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    env.update(forced)
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("test, isa, aten, message", [
    (BF16_FIXTURE_TEST, None, None, "ONEDNN_MAX_CPU_ISA is None, expected 'AVX2'. This test compares bf16 numbers "
     "with a committed fixture; run it as `ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python -m pytest ...` (`bash .ci/run` "
     "sets it)."),
    (BF16_FIXTURE_TEST, "AVX512_CORE", None, "ONEDNN_MAX_CPU_ISA is 'AVX512_CORE', expected 'AVX2'."),
    ("tests/test_losses.py::test_official_seed_replays_the_fixture_draws", BF16_FIXTURE_ISA, "default",
     "ATen runs its DEFAULT kernels, whose normal draws differ from the vectorized ones this test's fixture holds; run "
     "it without ATEN_CPU_CAPABILITY=default."),
    ("tests/test_pipeline.py::test_compiled_transformer_samples_like_eager", BF16_FIXTURE_ISA, "avx2",
     "ATEN_CPU_CAPABILITY=avx2 is set, and torch.compile's CPU kernels do not match ATen's forced ones; run this test "
     "without it (`bash .ci/run` unsets it)."),
])
def test_a_test_off_its_instruction_set_fails_saying_how_to_run_it(test, isa, aten, message):
    forced = {} if aten is None else {"ATEN_CPU_CAPABILITY": aten}
    result = run(["-m", "pytest", "-p", "no:cacheprovider", "-q", test], isa, **forced)
    assert result.returncode == 1, result.stdout
    assert "1 error" in result.stdout  # the fixture fails the test before it starts
    assert message in " ".join(result.stdout.split()), result.stdout


def test_a_cap_set_after_start_is_caught_where_onednn_has_bf16_kernels():
    probe = "import torch; print(torch.ops.mkldnn._is_mkldnn_bf16_supported())"
    has_bf16_kernels = run(["-c", probe], None).stdout.strip() == "True"
    late = ("import os, torch; torch.nn.functional.linear(torch.ones(8, 8).bfloat16(), torch.ones(8, 8).bfloat16()); "
            "os.environ['ONEDNN_MAX_CPU_ISA'] = 'AVX2'; from tests.official_fixtures import bf16_isa_problem; "
            "print(bf16_isa_problem())")
    problem = run(["-c", late], None).stdout.strip()
    if has_bf16_kernels:  # this CPU's oneDNN runs bf16 kernels, so a late cap is seen not to be in force
        assert problem == ("ONEDNN_MAX_CPU_ISA=AVX2 is set but oneDNN still runs bf16 kernels: it was set after the "
                           "process started")
    else:  # an AVX2-only CPU: the cap changes nothing, and the check finds the kernels the fixtures were made with
        assert problem == "None"


def test_the_fixture_maker_refuses_without_the_cap(tmp_path):
    result = run(["-m", "tests.fixtures.make_official_fixtures", "--reference_repo", str(tmp_path),
                  "--jit_reference_repo", str(tmp_path), "--output_dir", str(tmp_path / "out")], None)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: ONEDNN_MAX_CPU_ISA is None, expected 'AVX2'; the bf16 fixtures are made with oneDNN capped to one "
        "instruction set: run `ONEDNN_MAX_CPU_ISA=AVX2 python -m tests.fixtures.make_official_fixtures ...`"]
    assert not (tmp_path / "out").exists()
