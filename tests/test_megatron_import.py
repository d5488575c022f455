"""megatron-core's torch.compile decorators are deferred to first call (calm_dist/compat/megatron_import.py):
a process that builds and trains a backbone never loads torch's compiler stack, and a deferred
function still compiles and computes what the plain one does. Each check runs in a fresh process,
since what matters is what an import loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.dist_utils import REPO_ROOT


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_a_backbone_builds_and_trains_without_loading_torchs_compiler():
    out = _run("""
        import sys, torch
        from calm_dist.config.schema import ModelConfig
        from calm_dist.models.backbone import Backbone
        from calm_dist.parallel.state import ensure_model_parallel
        import megatron.core.jit, megatron.core.transformer.utils as mutils
        from calm_dist.compat.megatron_import import compile_on_first_call

        ensure_model_parallel()
        cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_attention_heads=4,
                          max_position_embeddings=16)
        model = Backbone(cfg, attention_backend="sdpa")
        model(torch.randn(2, 8, 32)).square().mean().backward()
        assert megatron.core.jit.jit_fuser is compile_on_first_call, megatron.core.jit.jit_fuser
        assert mutils.gelu_impl.__wrapped__.__name__ == "gelu_impl"  # decorated by the deferral
        print("loaded:", "torch._dynamo" in sys.modules, "torch._inductor" in sys.modules)
    """)
    assert "loaded: False False" in out, out


def test_a_deferred_function_compiles_at_its_first_call_and_computes_the_same():
    out = _run("""
        import sys, torch
        from calm_dist.compat.megatron_import import compile_on_first_call

        def swiglu(x):
            a, b = x.chunk(2, dim=-1)
            return torch.nn.functional.silu(a) * b

        deferred = compile_on_first_call(backend="eager")(swiglu)  # eager: no C++ toolchain needed
        before = "torch._dynamo" in sys.modules
        x = torch.randn(4, 6)
        assert torch.equal(deferred(x), swiglu(x))
        assert torch.equal(deferred(2 * x), swiglu(2 * x))  # the compiled function is kept and reused
        print("compiler loaded before:", before, "after:", "torch._dynamo" in sys.modules)
    """)
    assert "compiler loaded before: False after: True" in out, out
