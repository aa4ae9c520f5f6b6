import os
import sys

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def bf16_fixture_isa():
    """Fails the test, saying how to run it, unless oneDNN runs the bf16 kernels the bf16 fixtures were made with."""
    from tests.official_fixtures import BF16_FIXTURE_ISA, bf16_isa_problem

    problem = bf16_isa_problem()
    if problem is not None:
        pytest.fail(f"{problem}. This test compares bf16 numbers with a committed fixture; run it as "
                    f"`ONEDNN_MAX_CPU_ISA={BF16_FIXTURE_ISA} .venv/bin/python -m pytest ...` "
                    "(`bash .ci/run` sets it).", pytrace=False)


@pytest.fixture
def vectorized_random_draws():
    """Fails the test, saying why, unless ATen draws normal numbers with its vectorized kernels, as the committed
    draws were made: AVX2 and AVX-512 give the same draws, the scalar "default" capability others."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        pytest.fail(f"ATen runs its {capability} kernels, whose normal draws differ from the vectorized ones this test's "
                    "fixture holds; run it without ATEN_CPU_CAPABILITY=default.", pytrace=False)


@pytest.fixture
def compile_on_the_machines_kernels():
    """Fails the test, saying why, where ATEN_CPU_CAPABILITY forces ATen's kernels off the machine's instruction set:
    torch.compile builds its CPU kernels for the machine's, and with torch 2.14 they then fail to build ("default")
    or compute NaN (avx2 on an AVX-512 CPU)."""
    if "ATEN_CPU_CAPABILITY" in os.environ:
        pytest.fail(f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']} is set, and torch.compile's CPU kernels "
                    "do not match ATen's forced ones; run this test without it (`bash .ci/run` unsets it).",
                    pytrace=False)


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Forgets every test's compiled graphs after it: dynamo's recompile limit (8 per code object) counts the graphs
    of every model and batch shape compiled in this process, so without this, tests that compile fail by their order."""
    yield
    if "torch._dynamo" in sys.modules:
        torch.compiler.reset()
