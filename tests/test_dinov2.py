"""DINOv2 backbones against dinov2's own code: the released-weights conversion both
ways, and the features (tokens, intermediate layers, attention) of tiny random
models (tests/fixtures/dinov2/, made by its make_fixtures.py from dinov2's modules).

Every dimension and setting comes from the fixture's JSON and array shapes;
``DINO_JAX_DINOV2_FIXTURES=/dir`` runs the same tests on another set made by the script.
"""
import glob
import json
import os

import jax
import numpy as np
import pytest

from dino_jax import checkpoint, convert
from dino_jax.models import vit

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


# --------------------------------------------------------------------------
# Features against dinov2's forward_features / get_intermediate_layers / attention.
# --------------------------------------------------------------------------
# float32 on both sides; what differs is the order of summation (measured: ~2e-6).
TOL = 1e-4
FORMS = ("cpu", "generic")  # model.platform_ops: the CPU form and the one GPUs/TPUs run


def _rel(actual, expected):
    """max |a - e| / max |e| (0 for empty arrays: the register tokens of a model without)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.size == 0:
        return 0.0
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def _model_cfg(meta):
    """The dino_jax model config of a fixture, every field from its JSON."""
    return dict(arch="custom", patch_size=meta["patch_size"], embed_dim=meta["embed_dim"],
                depth=meta["depth"], num_heads=meta["num_heads"], mlp_ratio=meta["mlp_ratio"],
                img_size=meta["img_size"], layer_norm_eps=meta["layer_norm_eps"],
                num_register_tokens=meta["num_register_tokens"], layerscale_init=meta["init_values"],
                ffn="swiglu" if meta["ffn_layer"].startswith("swiglu") else "mlp",
                interpolate_offset=meta["interpolate_offset"],
                interpolate_antialias=meta["interpolate_antialias"], mask_token=True)


def _model_and_params(meta, arrays, platform_ops="auto"):
    model = vit.build_backbone(_model_cfg(meta), platform_ops=platform_ops)
    params = convert.torch_to_flax(_state_dict(arrays), meta["num_heads"], with_head=False)[0]["backbone"]
    return model, params


def _images(arrays, h, w):
    return np.asarray(arrays[f"inputs/{h}x{w}"], np.float32).transpose(0, 2, 3, 1)  # NCHW -> NHWC


@pytest.mark.parametrize("name", CASES)
def test_param_tree_is_the_converted_one(name):
    """The model's own parameters have exactly the converted names, shapes and dtypes."""
    meta, arrays = _load(name)
    model, params = _model_and_params(meta, arrays)
    h, w = meta["sizes"][0]
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, h, w, 3), np.float32)))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), shapes["params"])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", CASES)
def test_forward_features_match_dinov2(name, form):
    """CLS, patch and register tokens, the pre-norm tokens, the masked forward, the CLS
    feature of ``__call__`` and the last block's attention, at every fixture size."""
    meta, arrays = _load(name)
    model, params = _model_and_params(meta, arrays, form)
    v = {"params": params}
    for h, w in meta["sizes"]:
        key = f"{h}x{w}"
        x = _images(arrays, h, w)
        out = model.apply(v, x, return_attention=True, method="forward_features")
        for ours, theirs in (("x_norm_clstoken", "cls"), ("x_norm_patchtokens", "patch"),
                             ("x_norm_regtokens", "reg"), ("x_prenorm", "prenorm"),
                             ("attention", "attention")):
            err = _rel(out[ours], arrays[f"outputs/{theirs}/{key}"])
            assert err < TOL, (key, ours, err)
        k = 1 + meta["num_register_tokens"]
        np.testing.assert_array_equal(out["cls_attention"], np.asarray(out["attention"])[:, :, 0, k:])
        assert _rel(model.apply(v, x), arrays[f"outputs/cls/{key}"]) < TOL, key
        att = model.apply(v, x, method="get_last_selfattention")
        assert _rel(att, arrays[f"outputs/attention/{key}"]) < TOL, key
        masked = model.apply(v, x, masks=arrays[f"inputs/masks/{key}"], method="forward_features")
        assert _rel(masked["x_norm_clstoken"], arrays[f"outputs/masked_cls/{key}"]) < TOL, key
        assert _rel(masked["x_norm_patchtokens"], arrays[f"outputs/masked_patch/{key}"]) < TOL, key


@pytest.mark.parametrize("name", CASES)
def test_intermediate_layers_match_dinov2(name):
    """``get_intermediate_layers(n, reshape, return_class_token, norm)`` for every argument
    combination the fixture recorded (``reshape`` gives NHWC here, NCHW in dinov2)."""
    meta, arrays = _load(name)
    model, params = _model_and_params(meta, arrays)
    for h, w in meta["sizes"]:
        x = _images(arrays, h, w)
        for c in meta["intermediate"]:
            n = c["n"] if isinstance(c["n"], int) else tuple(c["n"])
            res = model.apply({"params": params}, x, n=n, reshape=c["reshape"],
                              return_class_token=c["return_class_token"], norm=c["norm"],
                              method="get_intermediate_layers")
            base = f"outputs/intermediate/{c['name']}/{h}x{w}"
            count = len([k for k in arrays if k.startswith(base + "/") and k.endswith("/patch")])
            assert len(res) == count > 0, (c["name"], len(res), count)
            for i, item in enumerate(res):
                patch, cls = item if c["return_class_token"] else (item, None)
                patch = np.asarray(patch)
                if c["reshape"]:
                    patch = patch.transpose(0, 3, 1, 2)
                assert _rel(patch, arrays[f"{base}/{i}/patch"]) < TOL, (c["name"], h, w, i)
                if cls is not None:
                    assert _rel(cls, arrays[f"{base}/{i}/cls"]) < TOL, (c["name"], h, w, i)


def test_dino_defaults_build_dinos_vit():
    """With the DINOv2 fields at their defaults the model is DINO's ViT: the same parameter
    tree (no registers, LayerScale or mask token; fc1/fc2) as before the fields existed."""
    model = vit.build_backbone(dict(arch="custom", patch_size=8, embed_dim=16, depth=2, num_heads=2,
                                    img_size=32))
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
    assert sorted(tree["params"]) == ["blocks_0", "blocks_1", "cls_token", "norm", "patch_embed", "pos_embed"]
    assert sorted(tree["params"]["blocks_0"]) == ["attn", "mlp", "norm1", "norm2"]
    assert sorted(tree["params"]["blocks_0"]["mlp"]) == ["fc1", "fc2"]


# --------------------------------------------------------------------------
# The evaluators take a converted DINOv2 backbone.
# --------------------------------------------------------------------------
def test_evaluator_features_of_a_register_model(tmp_path):
    """What the evaluators compute (features.forward: k-NN/retrieval CLS, copy detection and
    DAVIS patch tokens, extract's attention, the linear probe's DINO and dinov2 layouts), the
    attention maps of visualize_attention and extract's output, on a backbone converted from a
    dinov2 register model, against dinov2's own outputs: the registers are left out."""
    from dino_jax import extract  # noqa: PLC0415
    from dino_jax.eval import attention, features  # noqa: PLC0415

    name = next(n for n in CASES if _load(n)[0]["num_register_tokens"] > 0)
    meta, arrays = _load(name)
    out = _torch2jax(tmp_path, meta, _state_dict(arrays))
    model, params = checkpoint.load_backbone(out)
    assert model.num_register_tokens == meta["num_register_tokens"]
    h, w = meta["sizes"][1]
    key, x = f"{h}x{w}", _images(arrays, h, w)
    p = meta["patch_size"]
    cls = features.forward(model, params, x, "cls")
    assert _rel(cls, arrays[f"outputs/cls/{key}"]) < TOL
    cls_t, patch = features.forward(model, params, x, "tokens")
    assert _rel(cls_t, arrays[f"outputs/cls/{key}"]) < TOL
    assert _rel(patch, arrays[f"outputs/patch/{key}"]) < TOL
    k = 1 + meta["num_register_tokens"]
    want_att = arrays[f"outputs/attention/{key}"][:, :, 0, k:]
    cls_a, att = features.forward(model, params, x, "cls_attention")
    assert _rel(att, want_att.reshape(len(x), meta["num_heads"], h // p, w // p)) < TOL
    one = attention.cls_attention(model, params, np.zeros((h, w, 3), np.uint8))
    assert one.shape == (meta["num_heads"], h // p, w // p)
    # The linear probe's features: the CLS tokens of the last 2 blocks, then the pooled patches.
    combo = next(c for c in meta["intermediate"] if c["name"] == "list_cls")
    last = f"outputs/intermediate/{combo['name']}/{key}/{len(combo['n']) - 1}"
    lin = features.forward(model, params, x, "linear", n_last_blocks=1, avgpool=True, layout="dinov2")
    want = np.concatenate([arrays[last + "/cls"], arrays[last + "/patch"].mean(1)], -1)
    assert _rel(lin, want) < TOL
    lin = features.forward(model, params, x, "linear", n_last_blocks=1, avgpool=True)
    assert _rel(lin, np.stack([arrays[last + "/cls"], arrays[last + "/patch"].mean(1)], -1).reshape(len(x), -1)) < TOL
    # extract: CLS features and CLS-to-patch attention of an .npz of images.
    images = np.clip(np.round(np.random.default_rng(0).uniform(0, 255, (2, h, w, 3))), 0, 255).astype(np.uint8)
    npz = str(tmp_path / "images.npz")
    np.savez(npz, images=images)
    res = str(tmp_path / "f.npz")
    assert extract.main(["--checkpoint", out, "--input", npz, "--output", res, "--attention"]) == 0
    with np.load(res) as got:
        xs = np.stack([np.asarray(features.array_inputs(images, p, None).get(i)) for i in range(2)])
        ref = model.apply({"params": params}, xs, return_attention=True, method="forward_features")
        assert _rel(got["cls"], ref["x_norm_clstoken"]) < TOL
        assert got["attention"].shape[-3:] == (meta["num_heads"], h // p, w // p)


# --------------------------------------------------------------------------
# One config per hub backbone, with dinov2/hub/backbones.py's settings.
# --------------------------------------------------------------------------
# (width, depth, heads, ffn) of dinov2's vit_small/base/large/giant2 builders and the hub's ffn.
HUB_ARCHS = {"vits14": (384, 12, 6, "mlp"), "vitb14": (768, 12, 12, "mlp"),
             "vitl14": (1024, 24, 16, "mlp"), "vitg14": (1536, 40, 24, "swiglu")}


@pytest.mark.parametrize("name", [f"dinov2_{a}{r}" for a in HUB_ARCHS for r in ("", "_reg")])
def test_hub_configs_build_the_hub_backbones(name):
    """configs/dinov2_*.py build the hub's architecture (patch 14 at 518, LayerScale 1.0,
    mask token, 4 registers with offset 0 and antialias for _reg, else 0.1 without), with
    crop sizes the patch divides."""
    import importlib.util  # noqa: PLC0415

    from dino_jax import train  # noqa: PLC0415

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    backbone = train.build_models(config)[0]
    width, depth, heads, ffn = HUB_ARCHS[name.split("_")[1]]
    reg = name.endswith("_reg")
    assert (backbone.embed_dim, backbone.depth, backbone.num_heads, backbone.ffn) == (width, depth, heads, ffn)
    assert (backbone.patch_size, backbone.img_size, backbone.layerscale_init, backbone.mask_token) == (14, 518, 1.0, True)
    assert (backbone.num_register_tokens, backbone.interpolate_offset, backbone.interpolate_antialias) == (
        (4, 0.0, True) if reg else (0, 0.1, False))
    assert config.data.global_crop_size % 14 == 0 and config.data.local_crop_size % 14 == 0
