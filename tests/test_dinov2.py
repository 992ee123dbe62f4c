"""DINOv2 backbones against dinov2's own code: the released-weights conversion both
ways, and the features (tokens, intermediate layers, attention) of tiny random
models (tests/fixtures/dinov2/, made by its make_fixtures.py from dinov2's modules).

Every dimension and setting comes from the fixture's JSON and array shapes;
``DINO_JAX_DINOV2_FIXTURES=/dir`` runs the same tests on another set made by the script.
"""
import glob
import json
import os

import numpy as np
import pytest

from dino_jax import checkpoint, convert

torch = pytest.importorskip("torch", reason="the .pth paths need the torch extra (installed in CI)")

FIXTURES = os.environ.get("DINO_JAX_DINOV2_FIXTURES",
                          os.path.join(os.path.dirname(__file__), "fixtures", "dinov2"))


def _cases():
    names = []
    for path in sorted(glob.glob(os.path.join(FIXTURES, "*.json"))):
        with open(path) as f:
            if json.load(f).get("kind") == "dinov2_backbone":
                names.append(os.path.splitext(os.path.basename(path))[0])
    if not names:
        raise RuntimeError(f"no dinov2_backbone fixtures in {FIXTURES}: the parity tests need them")
    return names


CASES = _cases()


def _load(name):
    with open(os.path.join(FIXTURES, name + ".json")) as f:
        meta = json.load(f)
    with np.load(os.path.join(FIXTURES, name + ".npz")) as d:
        arrays = {k: np.asarray(d[k]) for k in d.files}
    return meta, arrays


def _state_dict(arrays):
    return {k[len("state_dict/"):]: v for k, v in arrays.items() if k.startswith("state_dict/")}


def _torch2jax(tmp_path, meta, sd, name="hub.pth", extra=()):
    """The fixture's state dict saved as a hub ``*_pretrain.pth`` and converted."""
    pth = str(tmp_path / name)
    torch.save({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, pth)
    out = str(tmp_path / (name + ".dir"))
    argv = ["torch2jax", "--input", pth, "--output", out, "--num_heads", str(meta["num_heads"]),
            "--interpolate_offset", str(meta["interpolate_offset"]),
            "--interpolate_antialias", str(meta["interpolate_antialias"]), *extra]
    assert convert.main(argv) == 0
    return out


@pytest.mark.parametrize("name", CASES)
def test_hub_state_dict_roundtrip_is_bit_identical(tmp_path, name):
    """torch2jax then jax2torch gives back every tensor of dinov2's state dict, bit for
    bit, under exactly its names and shapes: what ``load_state_dict(strict=True)`` takes."""
    meta, arrays = _load(name)
    sd = _state_dict(arrays)
    out = _torch2jax(tmp_path, meta, sd)
    params, cfg, head = checkpoint.load_params_dir(out)
    assert head is None and set(params) == {"backbone"}
    assert {k: cfg[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "img_size",
                                "num_register_tokens", "interpolate_offset",
                                "interpolate_antialias")} == {
        k: meta[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "img_size",
                             "num_register_tokens", "interpolate_offset", "interpolate_antialias")}
    assert cfg["mlp_ratio"] == meta["mlp_ratio"] and cfg["mask_token"] is True
    assert cfg["ffn"] == ("swiglu" if meta["ffn_layer"].startswith("swiglu") else "mlp")
    assert cfg["layerscale_init"] == meta["init_values"]
    bb = params["backbone"]
    assert bb["blocks_0"]["ls1"]["gamma"].shape == (meta["embed_dim"],)
    assert ("register_tokens" in bb) == (meta["num_register_tokens"] > 0)
    back = str(tmp_path / "back.pth")
    assert convert.main(["jax2torch", "--input", out, "--output", back]) == 0
    got = torch.load(back)
    assert sorted(got) == sorted(sd)
    for k, v in sd.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], torch.from_numpy(v)), k


def test_hub_settings_are_the_default_and_training_checkpoints_load(tmp_path):
    """Without flags the interpolation settings are the hub's (they are not in the
    weights); a dinov2 training checkpoint (``teacher`` entry, ``backbone.`` names,
    blocks chunked as ``blocks.<chunk>.<i>``, DINO/iBOT heads) gives the same params."""
    name = next(n for n in CASES if _load(n)[0]["num_register_tokens"] > 0)
    meta, arrays = _load(name)
    sd = _state_dict(arrays)
    pth = str(tmp_path / "hub.pth")
    torch.save({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, pth)
    assert convert.main(["torch2jax", "--input", pth, "--output", str(tmp_path / "a"),
                         "--num_heads", str(meta["num_heads"])]) == 0
    want, cfg, _ = checkpoint.load_params_dir(str(tmp_path / "a"))
    assert (cfg["interpolate_offset"], cfg["interpolate_antialias"]) == (0.0, True)
    chunked = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "blocks":  # two chunks, as DINOv2's BlockChunk names them
            k = ".".join(["blocks", str(int(int(parts[1]) >= meta["depth"] // 2))] + parts[1:])
        chunked["backbone." + k] = torch.from_numpy(v.copy())
    chunked["dino_head.mlp.0.weight"] = torch.zeros(3, 3)
    train_pth = str(tmp_path / "teacher_checkpoint.pth")
    torch.save({"teacher": chunked}, train_pth)
    assert convert.main(["torch2jax", "--input", train_pth, "--output", str(tmp_path / "b"),
                         "--num_heads", str(meta["num_heads"])]) == 0
    got, cfg_b, head = checkpoint.load_params_dir(str(tmp_path / "b"))
    assert head is None and cfg_b == cfg
    flat_w = dict(_flatten(want))
    flat_g = dict(_flatten(got))
    assert flat_w.keys() == flat_g.keys()
    assert all(np.array_equal(flat_w[k], flat_g[k]) for k in flat_w)


def _flatten(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield prefix + k, np.asarray(v)


@pytest.mark.parametrize("damage,expect", [
    ("drop_ls", "missing keys: blocks.{last}.ls2.gamma"),
    ("mixed_ffn", "missing keys: blocks.{last}.mlp.{ffn_a}"),
    ("shape", "shape mismatch: register_tokens"),
    ("dino_arg", "--interpolate_offset is for DINOv2 backbones"),
])
def test_wrong_architecture_is_refused_in_one_line(tmp_path, capsys, damage, expect):
    name = next(n for n in CASES if _load(n)[0]["num_register_tokens"] > 0)
    meta, arrays = _load(name)
    sd = _state_dict(arrays)
    last = meta["depth"] - 1
    swiglu = meta["ffn_layer"].startswith("swiglu")
    expect = expect.format(last=last, ffn_a="w12" if swiglu else "fc1")
    argv_extra = []
    if damage == "drop_ls":
        del sd[f"blocks.{last}.ls2.gamma"]
    elif damage == "mixed_ffn":  # the last block's FFN of the other kind
        ren = {"w12": "fc1", "w3": "fc2"} if swiglu else {"fc1": "w12", "fc2": "w3"}
        for a, b in ren.items():
            for p in ("weight", "bias"):
                sd[f"blocks.{last}.mlp.{b}.{p}"] = sd.pop(f"blocks.{last}.mlp.{a}.{p}")
    elif damage == "shape":
        sd["register_tokens"] = np.concatenate([sd["register_tokens"]] * 2, axis=2)
    else:
        sd = {k: v for k, v in sd.items() if k not in ("mask_token", "register_tokens")
              and ".ls" not in k and ".mlp." not in k}
        d, hid = meta["embed_dim"], int(meta["embed_dim"] * meta["mlp_ratio"])
        for i in range(meta["depth"]):
            sd[f"blocks.{i}.mlp.fc1.weight"] = np.zeros((hid, d), np.float32)
            sd[f"blocks.{i}.mlp.fc1.bias"] = np.zeros(hid, np.float32)
            sd[f"blocks.{i}.mlp.fc2.weight"] = np.zeros((d, hid), np.float32)
            sd[f"blocks.{i}.mlp.fc2.bias"] = np.zeros(d, np.float32)
        argv_extra = ["--interpolate_offset", "0.0"]
    npz = str(tmp_path / "bad.npz")
    np.savez(npz, **sd)
    out = tmp_path / "out"
    rc = convert.main(["torch2jax", "--input", npz, "--output", str(out),
                       "--num_heads", str(meta["num_heads"]), *argv_extra])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and expect in err and len(err.splitlines()) == 1, err
    assert not out.exists()
