"""Import megatron-core without loading torch's compiler stack at start-up.

Why: megatron-core 0.16.1 decorates about twenty functions (bias-GeLU/SwiGLU fusions, L2 norm,
MoE routing, ...) with `megatron.core.jit.jit_fuser`, which is `torch.compile`. Applying
`torch.compile`, even before any call, imports torch._dynamo and torch._inductor: 2-3 s of CPU in
every process that imports megatron (each rank, each calm-eval or calm-generate), for functions a
calm-dist model never calls (its configs turn those fusions off; its norms are RMSNorm).

How: a finder on `sys.meta_path`, installed when `calm_dist` is imported, replaces `jit_fuser`
right after megatron's `jit` module runs and before the modules that decorate with it import it.
The replacement compiles each function with `torch.compile` at its first call, which is when
`torch.compile` itself would have compiled it: whoever calls one gets the same compiled code. If
megatron was imported before calm_dist, nothing changes.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

JIT_MODULE = "megatron.core.jit"


def compile_on_first_call(fn=None, **compile_kwargs):
    """`torch.compile(fn, **compile_kwargs)`, applied when `fn` is first called (so torch's compiler
    is imported only then). Usable bare (`@compile_on_first_call`) or with arguments."""
    if fn is None:
        return functools.partial(compile_on_first_call, **compile_kwargs)
    compiled = None

    @functools.wraps(fn)
    def first_call_compiles(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            import torch  # lazy: calm_dist imports this module, and planning commands run without torch

            compiled = torch.compile(fn, **compile_kwargs)
        return compiled(*args, **kwargs)

    return first_call_compiles


class _DeferMegatronJit(importlib.abc.MetaPathFinder):
    """Finds megatron's `jit` module as the path finder would, and swaps its `jit_fuser` once the
    module has run."""

    def find_spec(self, name, path, target=None):
        if name != JIT_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            module.jit_fuser = compile_on_first_call

        spec.loader.exec_module = exec_module
        return spec


def defer_megatron_compile() -> None:
    """Install the finder (once per process). A no-op for a megatron already imported."""
    if JIT_MODULE in sys.modules or any(isinstance(f, _DeferMegatronJit) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _DeferMegatronJit())
