"""Official PyTorch ViG / ViG-H state_dict -> Flax parameters; the only file that knows torch names.

    python -m vig_jax.convert official.pth out_dir [--model vig_s] [--overwrite]

loads the checkpoint with torch (`pip install -e ".[convert]"`), converts its "model" entry, and
writes `out_dir/params` (orbax) and `out_dir/model.json` ({"model": name, "num_classes": n}).
Without `--model` the model is the registered ViG variant whose parameter shapes the checkpoint
matches.
Read the result back with `load_params(out_dir)` and `load_model_info(out_dir)`.
"""

import argparse
import pathlib
import re
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

from vig_jax.models import VARIANTS, create_model, model_class
from vig_jax.models.vig import ViG
from vig_jax.models.vig_h import ViGH
from vig_jax.train import checkpoint

# Layout changes from torch to Flax.
_TRANSFORMS = {
    "copy": lambda w: w,
    "linear": lambda w: w.T,  # [out, in] -> [in, out]
    "conv": lambda w: w.transpose(
        2, 3, 1, 0
    ),  # [O, I, kh, kw] -> [kh, kw, I, O]; depthwise -> [3, 3, 1, C]
}

# The GLA layer, shared by both families: (official suffix, our suffix, transform).
_GLA = [
    ("in_proj.0.weight", "dwconv/kernel", "conv"),
    ("qkv_proj.weight", "qkv/kernel", "linear"),
    ("gk_proj.0.weight", "gate_down/kernel", "linear"),
    ("gk_proj.1.weight", "gate_up/kernel", "linear"),
    ("gk_proj.1.bias", "gate_up/bias", "copy"),
    ("g_norm.weight", "o_norm/scale", "copy"),
    ("l_norm.weight", "local_norm/scale", "copy"),
    ("g_proj.weight", "mix_gate/kernel", "linear"),
    ("g_proj.bias", "mix_gate/bias", "copy"),
    ("o_proj.weight", "out/kernel", "linear"),
]


def _conv_norm(official: str, ours: str) -> list[tuple[str, str, str]]:
    """Conv (at official index `conv`) and LayerNorm (at `norm`) of one ConvNorm."""
    conv, norm = official.split("|")
    return [
        (f"{conv}.weight", f"{ours}/conv/kernel", "conv"),
        (f"{conv}.bias", f"{ours}/conv/bias", "copy"),
        (f"{norm}.weight", f"{ours}/norm/scale", "copy"),
        (f"{norm}.bias", f"{ours}/norm/bias", "copy"),
    ]


# The one name-mapping table: official template -> our template ({i}, {j} are indices), transform.
NAME_MAP = {
    "vig": [
        ("pos_embed", "pos_embed", "copy"),
        *_conv_norm("patch_embed.proj.0|patch_embed.proj.1", "stem/stage1"),
        *_conv_norm("patch_embed.proj.3|patch_embed.proj.4", "stem/stage2"),
        ("blocks.{i}.attn_norm.weight", "blocks_{i}/attn_norm/scale", "copy"),
        *[(f"blocks.{{i}}.attn.{a}", f"blocks_{{i}}/attn/{b}", t) for a, b, t in _GLA],
        ("blocks.{i}.mlp_norm.weight", "blocks_{i}/mlp_norm/scale", "copy"),
        ("blocks.{i}.mlp.gate_proj.weight", "blocks_{i}/mlp/up/kernel", "linear"),
        ("blocks.{i}.mlp.down_proj.weight", "blocks_{i}/mlp/down/kernel", "linear"),
        ("norm.weight", "norm/scale", "copy"),
        ("head.weight", "head/kernel", "linear"),
        ("head.bias", "head/bias", "copy"),
    ],
    "vig_h": [
        *_conv_norm("patch_embed.0|patch_embed.2", "stem/stage1"),
        *_conv_norm("patch_embed.5|patch_embed.7", "stem/stage2"),
        ("layers.{i}.blocks.{j}.norm.weight", "stages_{i}_{j}/attn_norm/scale", "copy"),
        ("layers.{i}.blocks.{j}.norm.bias", "stages_{i}_{j}/attn_norm/bias", "copy"),
        *[
            (f"layers.{{i}}.blocks.{{j}}.op.{a}", f"stages_{{i}}_{{j}}/attn/{b}", t)
            for a, b, t in _GLA
        ],
        ("layers.{i}.blocks.{j}.norm2.weight", "stages_{i}_{j}/mlp_norm/scale", "copy"),
        ("layers.{i}.blocks.{j}.norm2.bias", "stages_{i}_{j}/mlp_norm/bias", "copy"),
        ("layers.{i}.blocks.{j}.mlp.fc1.weight", "stages_{i}_{j}/mlp/up/kernel", "linear"),
        ("layers.{i}.blocks.{j}.mlp.fc2.weight", "stages_{i}_{j}/mlp/down/kernel", "linear"),
        *_conv_norm("layers.{i}.downsample.1|layers.{i}.downsample.3", "downsamples_{i}"),
        ("classifier.norm.weight", "head_norm/scale", "copy"),
        ("classifier.norm.bias", "head_norm/bias", "copy"),
        ("classifier.head.weight", "head/kernel", "linear"),
        ("classifier.head.bias", "head/bias", "copy"),
    ],
}
_FAMILY = {ViG: "vig", ViGH: "vig_h"}
_HEAD_KEY = {"vig": "head.weight", "vig_h": "classifier.head.weight"}


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(pattern + "$")


_RULES = {family: [(_compile(a), b, t) for a, b, t in table] for family, table in NAME_MAP.items()}


def param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{"a/b/kernel": shape} of a model's parameters, from `jax.eval_shape` (nothing allocated)."""
    images = jnp.zeros((1, 64, 64, 3), jnp.float32)  # parameter shapes do not depend on image size
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    return {k: tuple(v.shape) for k, v in flatten_dict(tree["params"], sep="/").items()}


def _family_of(model: nn.Module) -> str:
    if type(model) not in _FAMILY:
        raise ValueError(
            f"no official checkpoint layout for {type(model).__name__}; only ViG, ViGH"
        )
    return _FAMILY[type(model)]


def _torch_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    """The torch-layout shape whose `_TRANSFORMS[transform]` has `shape`."""
    if transform == "linear":
        return shape[::-1]
    if transform == "conv":  # [kh, kw, I, O] -> [O, I, kh, kw]
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def _official_name(path: str, family: str) -> tuple[str, str]:
    """(official name, transform) of our parameter `path`: the name table read backwards."""
    for official, ours, transform in NAME_MAP[family]:
        match = _compile(ours).match(path)
        if match:
            return official.format(**match.groupdict()), transform
    raise KeyError(path)  # every parameter of a ViG / ViG-H has a rule


def convert_state_dict(state_dict: dict[str, np.ndarray], model: str | nn.Module) -> dict:
    """Maps an official state_dict onto the Flax parameter tree of `model`.

    Args:
      state_dict: official parameter name -> array in torch layout (anything np.asarray takes).
      model: a registered name (the head width is read from the checkpoint) or a model instance.

    Returns:
      The nested "params" dict of float32 numpy arrays for `model.apply({"params": ...}, ...)`.

    Raises:
      ValueError: listing together every unknown key, missing parameter and mis-shaped one, all
        by their official (torch) names and shapes.
    """
    if isinstance(model, str):
        model = model_for_checkpoint(state_dict, model)
    plan, problems = _plan(state_dict, model)
    if problems:
        raise ValueError(f"state_dict does not fit {type(model).__name__}: " + "; ".join(problems))
    params = {
        path: np.asarray(_TRANSFORMS[transform](np.asarray(state_dict[key])), np.float32)
        for key, (path, transform) in plan.items()
    }
    return unflatten_dict(params, sep="/")


def _plan(state_dict: dict, model: nn.Module) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Where each official key goes ({key: (our path, transform)}) and, by shapes alone (no array
    is converted), every unknown, missing and mis-shaped key, by official names and torch shapes."""
    family = _family_of(model)
    expected = param_shapes(model)
    plan, unknown, misshaped = {}, [], []
    for key, value in state_dict.items():
        for pattern, ours, rule in _RULES[family]:
            match = pattern.match(key)
            if match:
                path, transform = ours.format(**match.groupdict()), rule
                break
        else:
            unknown.append(key)
            continue
        if path not in expected:
            unknown.append(f"{key} (no such parameter in this model)")
            continue
        want = _torch_shape(expected[path], transform)
        if tuple(np.shape(value)) != want:
            misshaped.append(f"{key}: {tuple(np.shape(value))}, expected {want}")
        plan[key] = (path, transform)
    placed = {path for path, _ in plan.values()}
    missing = sorted(_official_name(path, family)[0] for path in set(expected) - placed)
    problems = [
        f"{label} ({len(items)}): {', '.join(items)}"
        for label, items in (("unknown", unknown), ("missing", missing), ("mis-shaped", misshaped))
        if items
    ]
    return plan, problems


def model_for_checkpoint(state_dict: dict[str, np.ndarray], name: str) -> nn.Module:
    """The registered model `name` with the head width of the checkpoint (float32, bigla "auto")."""
    cls = model_class(name)  # raises the registry's error for an unknown name
    if cls not in _FAMILY:
        raise ValueError(f"no official checkpoint layout for {name!r}; only ViG and ViG-H models")
    head = _HEAD_KEY[_FAMILY[cls]]
    if head not in state_dict:
        raise ValueError(f"{head!r} not in the state_dict: not a {name!r} checkpoint")
    return create_model(name, num_classes=int(np.shape(state_dict[head])[0]))


def infer_model_name(state_dict: dict[str, np.ndarray]) -> str:
    """The registered ViG / ViG-H variant whose parameter names and shapes the state_dict fits."""
    tried = []
    for name, (cls, _) in VARIANTS.items():
        if cls not in _FAMILY or _HEAD_KEY[_FAMILY[cls]] not in state_dict:
            continue
        tried.append(name)
        if not _plan(state_dict, model_for_checkpoint(state_dict, name))[1]:
            return name
    raise ValueError(
        f"the state_dict matches no registered variant (tried {tried or 'none'}); "
        "pass --model, or build the model with overrides and call convert_state_dict"
    )


def save_params(
    params: dict,
    out_dir: str | pathlib.Path,
    *,
    model_name: str,
    num_classes: int,
    overwrite: bool = False,
):
    """Writes out_dir/params (orbax) and out_dir/model.json ({"model", "num_classes"}).

    Raises:
      FileExistsError: out_dir already holds a converted checkpoint and `overwrite` is False.
    """
    checkpoint.save_converted(
        out_dir, params, {"model": model_name, "num_classes": num_classes}, overwrite=overwrite
    )


def load_params(path: str | pathlib.Path) -> dict:
    """The "params" tree saved by `save_params` / the command line, as numpy float32 arrays."""
    return jax.tree.map(np.asarray, checkpoint.load_converted(path))


def load_model_info(path: str | pathlib.Path) -> dict:
    """{"model": name, "num_classes": n} saved next to the parameters."""
    info = checkpoint.read_model_json(path)
    if info is None:
        raise FileNotFoundError(
            f"{pathlib.Path(path) / 'model.json'} not found: not a converted checkpoint"
        )
    return info


def convert_checkpoint(
    state_dict: dict[str, np.ndarray],
    out_dir: str | pathlib.Path,
    model_name: str | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Converts and saves; infers the model when `model_name` is None. Returns the model name.

    Raises:
      FileExistsError: out_dir already holds a converted checkpoint and `overwrite` is False
        (checked first, before the conversion).
    """
    if not overwrite and checkpoint.read_model_json(out_dir) is not None:
        raise FileExistsError(
            f"{pathlib.Path(out_dir).resolve()} already holds a converted checkpoint"
        )
    name = model_name or infer_model_name(state_dict)
    model = model_for_checkpoint(state_dict, name)
    params = convert_state_dict(state_dict, model)
    save_params(
        params, out_dir, model_name=name, num_classes=model.num_classes, overwrite=overwrite
    )
    return name


def load_torch_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads an official .pth (its "model" entry, or the dict itself) into float32 numpy arrays.

    Raises:
      FileNotFoundError: no file at `path`.
      ImportError: PyTorch is not installed (says how to install it).
      ValueError: the file is no PyTorch checkpoint, or holds no state_dict (name -> tensor).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "reading .pth checkpoints needs PyTorch: pip install -e '.[convert]' (or torch)"
        ) from e
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch reports a foreign file as anything from KeyError to EOFError
        raise ValueError(
            f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})".replace("\n", " ")
        ) from e
    state_dict = loaded.get("model", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ValueError(
            f"{path} holds a {type(state_dict).__name__}, not a state_dict (a dict of parameter "
            'name -> tensor, or one under "model")'
        )
    return {k: v.detach().float().numpy() for k, v in state_dict.items()}


def main(argv: list[str] | None = None) -> None:
    """The command line: errors are one line and exit code 2 (tracebacks with --verbose or
    VIG_VERBOSE=1)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("checkpoint", help="official .pth file")
    parser.add_argument("out_dir", help="folder for params/ and model.json")
    parser.add_argument("--model", help="registered name, e.g. vig_s; inferred when omitted")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a converted checkpoint in out_dir"
    )
    parser.add_argument("--verbose", action="store_true", help="print tracebacks with errors")
    args = parser.parse_args(argv)
    try:
        state_dict = load_torch_state_dict(args.checkpoint)
        name = convert_checkpoint(state_dict, args.out_dir, args.model, overwrite=args.overwrite)
    except FileExistsError as e:
        _fail(f"{e}; pass --overwrite to replace it", args.verbose)
    except (FileNotFoundError, ImportError, ValueError) as e:
        _fail(str(e), args.verbose)
    print(f"converted {args.checkpoint} as {name} -> {args.out_dir}")


def _fail(message: str, verbose: bool):
    from vig_jax.train import cli  # absl flags: only for the command line

    if verbose or cli.verbose([]):
        traceback.print_exc()
    cli.fail(f"error: {message}")


if __name__ == "__main__":
    main()
