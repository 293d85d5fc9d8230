"""Converter: layouts, error reporting, model inference, orbax round trip (golden params as input).

Numerical parity of converted models with the official ones is in test_models.test_golden_parity.
"""

import importlib.util

import jax
import numpy as np
import pytest

from tests.conftest import golden_file
from vig_jax.convert import (
    convert_checkpoint,
    convert_state_dict,
    infer_model_name,
    load_model_info,
    load_params,
    main,
)
from vig_jax.models import create_model


def _state_dict(filename):
    golden = np.load(golden_file(filename))
    return {k.removeprefix("param/"): golden[k] for k in golden.files if k.startswith("param/")}


def _vig_s_depth1():
    return create_model("vig_s", num_classes=10, depth=1)


def test_layouts_are_transposed_as_torch_expects():
    sd = _state_dict("vig_t_depth2.npz")
    params = convert_state_dict(sd, create_model("vig_t", num_classes=10, depth=2))
    attn = params["blocks_1"]["attn"]
    np.testing.assert_array_equal(attn["qkv"]["kernel"], sd["blocks.1.attn.qkv_proj.weight"].T)
    dw = sd["blocks.1.attn.in_proj.0.weight"]  # [C, 1, 3, 3]
    assert attn["dwconv"]["kernel"].shape == (3, 3, 1, 192)
    assert attn["dwconv"]["kernel"][2, 0, 0, 5] == dw[5, 0, 2, 0]
    conv = sd["patch_embed.proj.0.weight"]  # [O, I, kh, kw]
    assert params["stem"]["stage1"]["conv"]["kernel"][7, 1, 2, 40] == conv[40, 2, 7, 1]
    np.testing.assert_array_equal(params["pos_embed"], sd["pos_embed"])
    np.testing.assert_array_equal(
        params["blocks_0"]["attn"]["o_norm"]["scale"], sd["blocks.0.attn.g_norm.weight"]
    )


def test_errors_list_unknown_missing_and_misshaped_together():
    sd = dict(_state_dict("vig_s_depth1.npz"))
    sd["blocks.0.attn.rotary.freqs"] = np.zeros(3)  # no rule
    sd["blocks.3.attn_norm.weight"] = np.ones(384)  # a rule, but the model has 1 block
    del sd["norm.weight"]
    sd["head.bias"] = np.zeros(11)
    with pytest.raises(ValueError) as info:
        convert_state_dict(sd, _vig_s_depth1())
    message = str(info.value)
    assert (
        "unknown (2): blocks.0.attn.rotary.freqs, blocks.3.attn_norm.weight (-> blocks_3/"
        in message
    )
    assert "missing (1): norm/scale" in message
    assert "mis-shaped (1): head.bias: (11,) -> (11,), expected (10,)" in message


def test_model_names_resolve_and_reject():
    sd = _state_dict("vig_s_depth1.npz")
    with pytest.raises(ValueError, match=r"missing \(154\): blocks_1/"):  # 11 blocks x 14
        convert_state_dict(sd, "vig_s")
    with pytest.raises(ValueError, match="unknown model 'vig_ss'"):
        convert_state_dict(sd, "vig_ss")
    with pytest.raises(ValueError, match="not in the state_dict"):
        convert_state_dict(sd, "vig_h_t")


def test_infer_convert_save_and_load(tmp_path):
    """A full-depth ViG-T state_dict (golden block 1 repeated) is recognised, saved and restored."""
    sd = dict(_state_dict("vig_t_depth2.npz"))
    for i in range(2, 12):
        sd.update(
            {
                k.replace("blocks.1.", f"blocks.{i}."): v
                for k, v in sd.items()
                if k.startswith("blocks.1.")
            }
        )
    assert infer_model_name(sd) == "vig_t"
    assert convert_checkpoint(sd, tmp_path / "out") == "vig_t"
    assert load_model_info(tmp_path / "out") == {"model": "vig_t", "num_classes": 10}
    restored = load_params(tmp_path / "out")
    want = convert_state_dict(sd, "vig_t")
    assert jax.tree.structure(restored) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(restored), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, expected)

    with pytest.raises(ValueError, match="matches no registered variant"):
        infer_model_name(_state_dict("vig_t_depth2.npz"))  # depth 2 is no registered model


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_cli_without_torch_says_how_to_install(tmp_path):
    with pytest.raises(ImportError, match=r"pip install -e '\.\[convert\]'"):
        main([str(tmp_path / "official.pth"), str(tmp_path / "out")])
