"""Parameter and FLOP counts of the registered models at any input size.

    python -m vig_jax.flops vig_s --size 1024
    python -m vig_jax.flops deit_t --size 224 320      # H W

Counts the forward pass at batch 1 on abstract shapes (nothing is allocated), two ways:
  XLA FLOPs     `jax.jit(f).lower(...).compile().cost_analysis()["flops"]`. XLA counts a
                multiply-add as 2 FLOPs and every elementwise op (norms, activations, softmax) as
                1 FLOP per element. Two blind spots: a while loop (`lax.scan`) counts its body
                ONCE, whatever the trip count, and a custom call (a Pallas kernel) counts 0.
  matmul FLOPs  dot_general and convolution FLOPs (2 per multiply-add) summed over the jaxpr, with
                scan bodies multiplied by their length: the loop-aware count of the matmuls alone.
Papers' "FLOPs" columns (fvcore, as in DeiT and ViG) are multiply-accumulates: MACs = FLOPs / 2,
reported from the XLA count.

ViG is counted with `bigla_impl="chunked"` (pure jnp, visible to XLA; its inter-chunk state
recurrence is a `lax.scan`, which only the matmul count sees in full); DeiT with XLA softmax
attention, unpadded. The chunked form does more multiply-adds than the token recurrence (dense
64x64 intra-chunk blocks), so ViG's count depends on that algorithm, not only on the model.
"""

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from vig_jax.models import create_model, uses_bigla

# Primitives whose sub-jaxprs do not run once per call: their FLOPs cannot be read off the jaxpr.
_OPAQUE = ("while", "pallas_call")


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Counts for one forward pass at batch 1.

    Attributes:
      params: number of parameters.
      xla_flops: XLA cost analysis of the compiled forward (see the module docstring).
      matmul_flops: loop-aware dot + conv FLOPs from the jaxpr.
      opaque: primitives the matmul count could not look into (e.g. "while", "pallas_call").
      xla_loops: while loops in the compiled program (each counted once by XLA).
    """

    params: int
    xla_flops: float
    matmul_flops: float
    opaque: tuple[str, ...]
    xla_loops: int

    @property
    def macs(self) -> float:
        """Multiply-accumulates, the papers' convention: XLA FLOPs / 2."""
        return self.xla_flops / 2


def _sub_jaxprs(value):
    """Jaxprs held by one eqn parameter (a ClosedJaxpr, a Jaxpr, or a tuple of them)."""
    if isinstance(value, jex_core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jex_core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def matmul_flops(jaxpr) -> tuple[float, set[str]]:
    """2 · multiply-adds of every dot_general and conv in `jaxpr` (a Jaxpr), scans × their length.

    Returns (flops, names of opaque primitives met: while loops and Pallas calls are not counted).
    """
    total, opaque = 0.0, set()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contract = math.prod(lhs[i] for i in lhs_contract)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * contract
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial) axes
            # rhs's input-feature axis is already per group: in_features / feature_group_count.
            per_output = rhs[rhs_spec[1]] * math.prod(rhs[i] for i in rhs_spec[2:])
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
        elif name in _OPAQUE:
            opaque.add(name)
        else:
            counts = [matmul_flops(sub) for v in eqn.params.values() for sub in _sub_jaxprs(v)]
            for _, sub_opaque in counts:
                opaque |= sub_opaque
            flops = [f for f, _ in counts]
            if name == "cond":  # one branch runs: count the dearest
                total += max(flops, default=0.0)
            else:
                total += sum(flops) * (eqn.params["length"] if name == "scan" else 1)
    return total, opaque


def count_module(model, image_hw: tuple[int, int]) -> FlopCount:
    """Counts `model.apply(variables, images, train=False)` for images [1, H, W, 3] float32.

    Args:
      model: a linen Module with `__call__(images, *, train)`.
      image_hw: (H, W).
    """
    images = jax.ShapeDtypeStruct((1, *image_hw, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    traced = jax.jit(lambda v, x: model.apply(v, x, train=False)).trace(variables, images)
    flops, opaque = matmul_flops(traced.jaxpr.jaxpr)
    compiled = traced.lower().compile()
    cost = compiled.cost_analysis()
    return FlopCount(
        params=sum(math.prod(x.shape) for x in jax.tree.leaves(variables.get("params", {}))),
        xla_flops=float(cost["flops"]),
        matmul_flops=flops,
        opaque=tuple(sorted(opaque)),
        xla_loops=compiled.as_text().count(" while("),
    )


def count_model(name: str, image_hw: tuple[int, int], **overrides) -> FlopCount:
    """Counts a registered model (1000 classes, float32) at images [1, H, W, 3]; see module doc.

    `overrides` go to `create_model` (e.g. depth=1 for a quick check).
    """
    kernels = {"bigla_impl": "chunked"} if uses_bigla(name) else {}  # XLA sees into chunked only
    model = create_model(name, **kernels, **overrides)
    return count_module(model, image_hw)


def format_count(name: str, image_hw: tuple[int, int], count: FlopCount) -> str:
    """Human-readable report of `count` (what `python -m vig_jax.flops` prints)."""
    h, w = image_hw
    lines = [
        f"{name} @ {h}x{w}, batch 1, forward",
        f"params        {count.params:>15,}  ({count.params / 1e6:.2f} M)",
        f"XLA FLOPs     {count.xla_flops / 1e9:>15.3f} G  (multiply-add = 2, elementwise = 1)",
        f"MACs          {count.macs / 1e9:>15.3f} G  (= XLA FLOPs / 2: papers' 'FLOPs' column)",
        f"matmul FLOPs  {count.matmul_flops / 1e9:>15.3f} G  (dot + conv, loop-aware, from jaxpr)",
    ]
    if count.xla_loops:
        lines.append(
            f"note: {count.xla_loops} while loop(s) in the program; XLA counts each body once, "
            "the matmul count multiplies scans by their length"
        )
    if count.opaque:
        lines.append(f"note: not counted by the matmul count: {', '.join(count.opaque)}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="registered model name, e.g. vig_s or deit_t")
    parser.add_argument(
        "--size", type=int, nargs="+", default=[224], help="image side, or H W (default 224)"
    )
    args = parser.parse_args(argv)
    if len(args.size) > 2 or min(args.size) < 1:
        parser.error(f"--size takes one or two positive integers, got {args.size}")
    image_hw = (args.size[0], args.size[-1])
    print(format_count(args.model, image_hw, count_model(args.model, image_hw)))


if __name__ == "__main__":
    main()
