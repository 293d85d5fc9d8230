"""Model registry: `create_model(name, ...)`, `list_models(pattern)`, `model_class(name)`,
`uses_bigla(name)`; `inference_compiler_options()` for jitting a forward pass.

Each model module exports `VARIANTS = {name: (ModuleClass, defaults)}`; sizes are data, merged here.
"""

import dataclasses
import difflib
import fnmatch

import jax
import jax.numpy as jnp
from flax import linen as nn

from vig_jax.models import deit, vig, vig_h

VARIANTS: dict[str, tuple[type[nn.Module], dict]] = {
    **vig.VARIANTS,
    **vig_h.VARIANTS,
    **deit.VARIANTS,
}

# Arguments create_model sets itself; everything else a module declares may be overridden.
_FIXED = ("parent", "name", "num_classes", "dtype", "bigla_impl")


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered names matching a glob pattern, e.g. list_models("vig_h_*")."""
    return sorted(name for name in VARIANTS if fnmatch.fnmatch(name, pattern))


def model_class(name: str) -> type[nn.Module]:
    """The module class registered as `name`.

    Raises:
      ValueError: unknown name (lists the known names and the closest match).
    """
    if name not in VARIANTS:
        close = difflib.get_close_matches(name.lower(), VARIANTS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Known models: {', '.join(list_models())}")
    return VARIANTS[name][0]


def uses_bigla(name: str) -> bool:
    """Whether the model `name` has BiGLA layers (takes `bigla_impl`); raises for unknown names."""
    return "bigla_impl" in {f.name for f in dataclasses.fields(model_class(name))}


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    dtype: jnp.dtype = jnp.float32,
    bigla_impl: str = "auto",
    **overrides,
) -> nn.Module:
    """Builds a registered model: an unbound linen Module (params from `.init` or the converter).

    Args:
      name: one of `list_models()`, e.g. "vig_s" or "vig_h_t".
      num_classes: head width.
      dtype: compute dtype (parameters are float32).
      bigla_impl: BiGLA implementation for models that use it ("auto", "reference", "chunked",
        "pallas"); models without BiGLA accept only the default.
      **overrides: fields of the model class to change, e.g. depth=2 or drop_path_rate=0.0 for ViG,
        dims=(32, 64, 128, 256) for ViG-H, bigla_interpret=True. Execution forms that keep the
        parameters (ViG and ViG-H; see the model docstrings): fused_proj=True, dwconv="shift",
        fp32_mix=True, gates_in_kernel=True, compact_gates=False, mix_apart=False,
        mlp_split_up=True, mlp_mosaic_up=True (ViG), split_proj=True, save_states=False,
        bigla_chunk=32, packed_bigla=False, stem_impl="patches" or "blocks", scan_blocks=True
        (packed_bigla, compact_gates and mix_apart are on by default; plain ViG also has fp32_mix,
        mlp_split_up and stem_impl="blocks" on);
        remat="none" | "block" | "full" (also DeiT).

    Raises:
      ValueError: unknown name (lists the known names and the closest match) or unknown override.
    """
    cls, defaults = model_class(name), VARIANTS[name][1]
    fields = {f.name for f in dataclasses.fields(cls)}
    allowed = sorted(fields - set(_FIXED))
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name!r}; allowed: {allowed}")
    kwargs = {**defaults, **overrides, "num_classes": num_classes, "dtype": dtype}
    if uses_bigla(name):
        kwargs["bigla_impl"] = bigla_impl
    elif bigla_impl != "auto":
        raise ValueError(f"{name!r} has no BiGLA layer; bigla_impl={bigla_impl!r} does not apply")
    return cls(**kwargs)


def inference_compiler_options(backend: str | None = None) -> dict:
    """XLA options for compiling a forward pass on `backend` (default `jax.default_backend()`):
    `jax.jit(forward, compiler_options=inference_compiler_options())`.

    On GPUs every matmul goes to cuBLAS (`xla_gpu_enable_triton_gemm=False`). XLA otherwise turns
    some matmuls into Triton fusions, choosing each by timing it alone; in the whole ViG forward
    pass on an H200 the cuBLAS-only program ran 2-3% faster (ViG-S 224², ViG-T 1024²). Training
    steps keep XLA's choice, under which they ran faster. The library's forward passes (`predict`,
    the training loop's evaluation, the benchmarks' inference) compile with these options. `{}`
    on other backends.
    """
    if (backend or jax.default_backend()) != "gpu":
        return {}
    return {"xla_gpu_enable_triton_gemm": False}


__all__ = [
    "VARIANTS",
    "create_model",
    "inference_compiler_options",
    "list_models",
    "model_class",
    "uses_bigla",
]
