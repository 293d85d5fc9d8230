"""Converter: layouts, error reporting, model inference, orbax round trip (golden params as input).

Numerical parity of converted models with the official ones is in test_models.test_golden_parity.
"""

import importlib.util
import pickle
import sys
import types

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
    save_params,
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
    with pytest.raises(ValueError, match=r"unknown \(2\)") as info:
        convert_state_dict(sd, _vig_s_depth1())
    message = str(info.value)
    # One naming scheme, the official one: names and shapes as in the .pth file.
    assert (
        "unknown (2): blocks.0.attn.rotary.freqs, "
        "blocks.3.attn_norm.weight (no such parameter in this model)" in message
    )
    assert "missing (1): norm.weight" in message
    assert "mis-shaped (1): head.bias: (11,), expected (10,)" in message


def test_model_names_resolve_and_reject():
    sd = _state_dict("vig_s_depth1.npz")
    with pytest.raises(ValueError, match=r"missing \(154\): blocks\.1\."):  # 11 blocks x 14
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

    with pytest.raises(FileExistsError, match="already holds a converted checkpoint"):
        convert_checkpoint(sd, tmp_path / "out")
    sd["head.bias"] = sd["head.bias"] + 1
    convert_checkpoint(sd, tmp_path / "out", overwrite=True)
    np.testing.assert_array_equal(load_params(tmp_path / "out")["head"]["bias"], sd["head.bias"])

    with pytest.raises(ValueError, match="matches no registered variant"):
        infer_model_name(_state_dict("vig_t_depth2.npz"))  # depth 2 is no registered model


def _cli_error(capsys, *argv):
    """The one line `main(argv)` prints, after checking it exits with the user-error code."""
    with pytest.raises(SystemExit, match="^2$"):
        main([str(a) for a in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_cli_without_torch_says_how_to_install(tmp_path, capsys):
    pth = tmp_path / "official.pth"
    pth.write_bytes(b"x")
    assert "pip install -e '.[convert]'" in _cli_error(capsys, pth, tmp_path / "out")


def test_cli_missing_file_says_not_found_with_or_without_torch(tmp_path, capsys):
    line = _cli_error(capsys, tmp_path / "nope.pth", tmp_path / "out")
    assert line == f"error: {tmp_path / 'nope.pth'} not found"


class _FakeTensor(np.ndarray):
    """What the converter calls on a torch tensor, on a numpy array."""

    def detach(self):
        return self

    def float(self):
        return self.astype(np.float32)

    def numpy(self):
        return np.asarray(self)


@pytest.fixture
def pickle_torch(monkeypatch):
    """A stand-in `torch` whose `load` unpickles: the converter's checks of what a file holds,
    without PyTorch."""

    def load(path, map_location, weights_only):
        with open(path, "rb") as f:
            return pickle.load(f)

    fake = types.SimpleNamespace(load=load, Tensor=_FakeTensor)
    monkeypatch.setitem(sys.modules, "torch", fake)
    return fake


def test_cli_rejects_foreign_files_and_existing_output(tmp_path, capsys, pickle_torch):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    line = _cli_error(capsys, text, tmp_path / "out")
    assert line.startswith(f"error: {text} is not a PyTorch checkpoint (UnpicklingError")
    listed = tmp_path / "list.pth"
    listed.write_bytes(pickle.dumps([1, 2]))
    line = _cli_error(capsys, listed, tmp_path / "out")
    assert line == f"error: {listed} holds a list, not a state_dict (a dict of parameter name " + (
        '-> tensor, or one under "model")'
    )
    sd = {k: v.view(pickle_torch.Tensor) for k, v in _state_dict("vig_s_depth1.npz").items()}
    good = tmp_path / "vig_s_depth1.pth"
    good.write_bytes(pickle.dumps({"model": sd}))
    with pytest.raises(SystemExit, match="^2$"):  # no registered variant has depth 1
        main([str(good), str(tmp_path / "out")])
    assert "matches no registered variant" in capsys.readouterr().err
    out = tmp_path / "out"
    save_params({"w": np.ones(2)}, out, model_name="vig_t", num_classes=10)
    line = _cli_error(capsys, good, out)  # checked before converting
    assert line == f"error: {out.resolve()} already holds a converted checkpoint; pass " + (
        "--overwrite to replace it"
    )
