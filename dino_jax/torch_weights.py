"""Official PyTorch DINO and DINOv2 state dicts <-> Flax params: reading ``.pth``/``.npz``
files, picking the backbone/head of a training checkpoint, detecting the
architecture from tensor shapes, the name/layout mapping both ways, and writing
``.pth`` files (torch is imported only to read or write them). The library behind
``python -m dino_jax.convert``, which documents the accepted inputs.
"""
from __future__ import annotations

import io
import os
import re
from typing import Mapping

import numpy as np

from dino_jax import paths

# Official widths -> heads (DINO's vit_tiny/small/base, DINOv2's vit_large/giant2).
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1536: 24}


class ConversionError(ValueError):
    """A checkpoint that does not fit: one line naming what is wrong."""


# --------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------
def read_state_dict(path: str) -> dict:
    """{name: np.ndarray or nested dict} from a ``.pth``/``.pt`` or ``.npz``."""
    if paths.is_remote(path):  # gs://: read whole through the path layer, then as a local file
        try:
            paths.check_bucket(path)
        except paths.PathError as e:
            raise ConversionError(str(e)) from None
        if not paths.isfile(path):
            raise ConversionError(f"no such file: {path}")
        local = io.BytesIO(paths.read_bytes(path))
    elif not os.path.exists(path):
        raise ConversionError(f"no such file: {path}")
    else:
        local = path
    if path.endswith(".npz"):
        with np.load(local, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    try:
        import torch  # noqa: PLC0415 - only needed for .pth files
    except ImportError as e:
        raise ConversionError("reading a .pth needs PyTorch: pip install 'dino_jax[torch]'") from e
    try:
        obj = torch.load(local, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise ConversionError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e
    return _to_numpy(obj)


def _to_numpy(obj):
    if isinstance(obj, Mapping):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if hasattr(obj, "detach") and hasattr(obj, "numpy"):
        return obj.detach().cpu().numpy()
    return obj


def select_state_dict(raw: dict, checkpoint_key: str | None = "teacher") -> dict[str, np.ndarray]:
    """Pick the tensors of one network and strip DDP/wrapper prefixes.

    A flat npz whose names start with ``<key>/`` or ``<key>.`` is treated like a
    nested checkpoint. Returns names relative to the backbone (``cls_token``,
    ``blocks.0...``) and, when the checkpoint has them, ``head.*`` names.
    """
    sd = raw
    if checkpoint_key and checkpoint_key in raw and isinstance(raw[checkpoint_key], Mapping):
        sd = raw[checkpoint_key]
    elif any(isinstance(v, Mapping) for v in raw.values()):
        nets = [k for k, v in raw.items() if isinstance(v, Mapping) and _has_arrays(v)]
        if checkpoint_key not in (None, "") or len(nets) != 1:
            raise ConversionError(
                f"checkpoint key {checkpoint_key!r} not found; entries holding tensors: {sorted(nets)}")
        sd = raw[nets[0]]
    elif checkpoint_key:
        flat = {}
        for sep in ("/", "."):
            p = checkpoint_key + sep
            flat = {k[len(p):]: v for k, v in raw.items() if k.startswith(p)}
            if flat:
                break
        if flat:
            sd = flat
    out = {}
    for k, v in sd.items():
        if not isinstance(v, np.ndarray):
            continue
        k = re.sub(r"^module\.", "", k)
        k = re.sub(r"^backbone\.", "", k)
        if k.startswith(("dino_head.", "ibot_head.")):  # DINOv2 training heads: not converted
            continue
        # DINOv2 with block_chunks > 0 names block i ``blocks.<chunk>.<i>.``; the hub's
        # backbones (block_chunks=0) name it ``blocks.<i>.``.
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)
        out[k] = v
    if not out:
        raise ConversionError("the checkpoint holds no tensors")
    return out


def _has_arrays(d: Mapping) -> bool:
    return any(isinstance(v, np.ndarray) for v in d.values())


# --------------------------------------------------------------------------
# Architecture detection.
# --------------------------------------------------------------------------
def detect_backbone_config(sd: Mapping[str, np.ndarray], num_heads: int | None = None) -> dict:
    """Model-config dict (see ``vit.build_backbone``) from the tensor shapes."""
    from dino_jax.models.vit import arch_name  # noqa: PLC0415

    need = ["patch_embed.proj.weight", "pos_embed", "cls_token"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ConversionError(f"not a DINO ViT backbone: missing {', '.join(missing)}")
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise ConversionError(f"patch_embed.proj.weight has shape {w.shape}, expected (D, C, p, p)")
    embed_dim, in_chans, patch_size = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))),
                    default=-1)
    if depth == 0:
        raise ConversionError("not a DINO ViT backbone: no blocks.* tensors")
    n = sd["pos_embed"].shape[1] - 1
    side = int(round(np.sqrt(n)))
    if side * side != n:
        raise ConversionError(f"pos_embed has {n} patch positions, not a square grid")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    w3 = sd.get("blocks.0.mlp.w3.weight")
    if w3 is not None:
        mlp_ratio = _swiglu_ratio(embed_dim, int(w3.shape[1]))
    else:
        mlp_ratio = float(fc1.shape[0]) / embed_dim if fc1 is not None else 4.0
    if num_heads is None:
        num_heads = _HEADS_BY_WIDTH.get(embed_dim)
        if num_heads is None:
            raise ConversionError(
                f"width {embed_dim} is not an official ViT width (192/384/768): pass --num_heads")
    if embed_dim % num_heads:
        raise ConversionError(f"--num_heads {num_heads} does not divide the width {embed_dim}")
    cfg = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=int(num_heads),
               mlp_ratio=mlp_ratio, qkv_bias="blocks.0.attn.qkv.bias" in sd,
               img_size=side * patch_size, layer_norm_eps=1e-6, in_chans=in_chans)
    if any(k in sd for k in _DINOV2_MARKERS):
        regs = sd.get("register_tokens")
        cfg.update(
            num_register_tokens=int(regs.shape[1]) if regs is not None else 0,
            # The init value is not in the weights; 1.0 is what the hub builds with.
            layerscale_init=1.0 if "blocks.0.ls1.gamma" in sd else 0.0,
            ffn="swiglu" if w3 is not None else "mlp",
            mask_token="mask_token" in sd,
            # Not in the weights either: the hub's settings, which go with the registers.
            interpolate_offset=0.0 if regs is not None else 0.1,
            interpolate_antialias=regs is not None)
    cfg["arch"] = arch_name(embed_dim, depth, num_heads)
    return cfg


# Tensors only DINOv2 backbones have; any of them marks a DINOv2 state dict.
_DINOV2_MARKERS = ("mask_token", "register_tokens", "blocks.0.ls1.gamma", "blocks.0.mlp.w12.weight")


def _swiglu_ratio(embed_dim: int, hidden: int) -> float:
    """The mlp_ratio that gives a SwiGLU hidden width (4.0, the hub's, when it fits)."""
    from dino_jax.models.vit import swiglu_hidden  # noqa: PLC0415

    for ratio in (4.0, hidden * 1.5 / embed_dim):
        if swiglu_hidden(embed_dim, ratio) == hidden:
            return ratio
    raise ConversionError(f"SwiGLU hidden width {hidden} fits no mlp_ratio at width {embed_dim}")


def detect_head_config(sd: Mapping[str, np.ndarray]) -> dict | None:
    """DINOHead config from ``head.*`` tensors, or None when there is no head."""
    hs = {k[5:]: v for k, v in sd.items() if k.startswith("head.")}
    if not hs:
        return None
    if any("running_mean" in k for k in hs):
        raise ConversionError("heads with batch norm (use_bn_in_head) are not supported")
    idx = sorted(int(m.group(1)) for k in hs if (m := re.match(r"mlp\.(\d+)\.weight$", k)))
    if not idx and "mlp.weight" in hs:
        nlayers, hidden, bottleneck = 1, 0, hs["mlp.weight"].shape[0]
    elif idx:
        nlayers = len(idx)
        hidden = int(hs[f"mlp.{idx[0]}.weight"].shape[0]) if nlayers > 1 else 0
        bottleneck = int(hs[f"mlp.{idx[-1]}.weight"].shape[0])
    else:
        raise ConversionError("head.* tensors present but no head.mlp weights")
    if "last_layer.weight_v" not in hs:
        raise ConversionError("head has no last_layer.weight_v (weight-normalised last layer)")
    g = hs.get("last_layer.weight_g")
    return dict(out_dim=int(hs["last_layer.weight_v"].shape[0]), nlayers=nlayers,
                hidden_dim=hidden or 2048, bottleneck_dim=int(bottleneck),
                norm_last_layer=bool(g is not None and np.all(g == 1.0)))


# --------------------------------------------------------------------------
# Name/layout mapping. Dense: kernel = weight.T; Conv: (D,C,p,p) -> (p,p,C,D).
# --------------------------------------------------------------------------
def _backbone_mapping(depth: int, qkv_bias: bool = True, variant: Mapping | None = None):
    """[(torch name, flax path tuple, kind)] for every backbone tensor. ``variant``:
    the DINOv2 fields of a model config (registers, LayerScale, ffn, mask token)."""
    v = variant or {}
    m = [("cls_token", ("cls_token",), "id"), ("pos_embed", ("pos_embed",), "id"),
         ("patch_embed.proj.weight", ("patch_embed", "kernel"), "conv"),
         ("patch_embed.proj.bias", ("patch_embed", "bias"), "id"),
         ("norm.weight", ("norm", "scale"), "id"), ("norm.bias", ("norm", "bias"), "id")]
    if v.get("num_register_tokens", 0):
        m.append(("register_tokens", ("register_tokens",), "id"))
    if v.get("mask_token", False):
        m.append(("mask_token", ("mask_token",), "id"))
    ffn = (("mlp.w12", ("mlp", "w12")), ("mlp.w3", ("mlp", "w3"))) if v.get("ffn") == "swiglu" \
        else (("mlp.fc1", ("mlp", "fc1")), ("mlp.fc2", ("mlp", "fc2")))
    for i in range(depth):
        t, f = f"blocks.{i}.", f"blocks_{i}"
        for ln in ("norm1", "norm2"):
            m += [(t + ln + ".weight", (f, ln, "scale"), "id"), (t + ln + ".bias", (f, ln, "bias"), "id")]
        for tn, fp in (("attn.qkv", ("attn", "qkv")), ("attn.proj", ("attn", "proj"))) + ffn:
            m.append((t + tn + ".weight", (f, *fp, "kernel"), "dense"))
            if tn != "attn.qkv" or qkv_bias:
                m.append((t + tn + ".bias", (f, *fp, "bias"), "id"))
        if v.get("layerscale_init", 0.0):
            m += [(t + ls + ".gamma", (f, ls, "gamma"), "id") for ls in ("ls1", "ls2")]
    return m


def _head_mapping(nlayers: int):
    m = []
    for i in range(max(nlayers, 1)):
        t = "head.mlp." + (f"{2 * i}." if nlayers > 1 else "")
        m += [(t + "weight", (f"mlp_{i}", "kernel"), "dense"), (t + "bias", (f"mlp_{i}", "bias"), "id")]
    m += [("head.last_layer.weight_g", ("last_layer", "weight_g"), "dense"),
          ("head.last_layer.weight_v", ("last_layer", "weight_v"), "dense")]
    return m


def _to_flax(x, kind):
    if kind == "dense":
        return np.ascontiguousarray(x.T)
    if kind == "conv":
        return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
    return x


def _to_torch(x, kind):
    if kind == "dense":
        return np.ascontiguousarray(x.T)
    if kind == "conv":
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return x


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _expected_shapes(model_cfg, head_cfg):
    """{torch name: shape} the official modules would have (for mismatch messages)."""
    d, p, c = model_cfg["embed_dim"], model_cfg["patch_size"], model_cfg.get("in_chans", 3)
    hid = int(d * model_cfg["mlp_ratio"])
    n = (model_cfg["img_size"] // p) ** 2
    s = {"cls_token": (1, 1, d), "pos_embed": (1, n + 1, d), "patch_embed.proj.weight": (d, c, p, p),
         "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    if model_cfg.get("num_register_tokens", 0):
        s["register_tokens"] = (1, model_cfg["num_register_tokens"], d)
    if model_cfg.get("mask_token", False):
        s["mask_token"] = (1, d)
    for i in range(model_cfg["depth"]):
        t = f"blocks.{i}."
        for ln in ("norm1", "norm2"):
            s[t + ln + ".weight"] = s[t + ln + ".bias"] = (d,)
        s[t + "attn.qkv.weight"] = (3 * d, d)
        if model_cfg.get("qkv_bias", True):
            s[t + "attn.qkv.bias"] = (3 * d,)
        s[t + "attn.proj.weight"], s[t + "attn.proj.bias"] = (d, d), (d,)
        if model_cfg.get("ffn", "mlp") == "swiglu":
            from dino_jax.models.vit import swiglu_hidden  # noqa: PLC0415

            sh = swiglu_hidden(d, model_cfg["mlp_ratio"])
            s[t + "mlp.w12.weight"], s[t + "mlp.w12.bias"] = (2 * sh, d), (2 * sh,)
            s[t + "mlp.w3.weight"], s[t + "mlp.w3.bias"] = (d, sh), (d,)
        else:
            s[t + "mlp.fc1.weight"], s[t + "mlp.fc1.bias"] = (hid, d), (hid,)
            s[t + "mlp.fc2.weight"], s[t + "mlp.fc2.bias"] = (d, hid), (d,)
        if model_cfg.get("layerscale_init", 0.0):
            s[t + "ls1.gamma"] = s[t + "ls2.gamma"] = (d,)
    if head_cfg:
        nl, hd, bd, od = (head_cfg["nlayers"], head_cfg["hidden_dim"], head_cfg["bottleneck_dim"],
                          head_cfg["out_dim"])
        dims = [d] + ([hd] * (nl - 1) if nl > 1 else []) + [bd]
        for i in range(max(nl, 1)):
            t = "head.mlp." + (f"{2 * i}." if nl > 1 else "")
            s[t + "weight"], s[t + "bias"] = (dims[i + 1], dims[i]), (dims[i + 1],)
        s["head.last_layer.weight_g"], s["head.last_layer.weight_v"] = (od, 1), (od, bd)
    return s


def _check_names_and_shapes(sd, model_cfg, head_cfg):
    expected = _expected_shapes(model_cfg, head_cfg)
    names = {k for k in sd if head_cfg or not k.startswith("head.")}
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected))
    bad = sorted(f"{k} {tuple(sd[k].shape)} (expected {expected[k]})"
                 for k in set(expected) & names if tuple(sd[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(_abbrev(missing)))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(_abbrev(unexpected)))
    if bad:
        problems.append("shape mismatch: " + ", ".join(_abbrev(bad)))
    if problems:
        raise ConversionError("; ".join(problems))


def _abbrev(items, n=8):
    return items if len(items) <= n else items[:n] + [f"... ({len(items) - n} more)"]


def torch_to_flax(sd: Mapping[str, np.ndarray], num_heads: int | None = None,
                  with_head: bool = True):
    """(params {'backbone', ['head']}, model_cfg, head_cfg or None) from a
    selected state dict (backbone names, optional ``head.*``)."""
    model_cfg = detect_backbone_config(sd, num_heads)
    head_cfg = detect_head_config(sd) if with_head else None
    _check_names_and_shapes(sd, model_cfg, head_cfg)
    backbone = {}
    for tn, fp, kind in _backbone_mapping(model_cfg["depth"], model_cfg["qkv_bias"], model_cfg):
        _set(backbone, fp, _to_flax(np.asarray(sd[tn], np.float32), kind))
    params = {"backbone": backbone}
    if head_cfg:
        head = {}
        for tn, fp, kind in _head_mapping(head_cfg["nlayers"]):
            _set(head, fp, _to_flax(np.asarray(sd[tn], np.float32), kind))
        params["head"] = head
    return params, model_cfg, head_cfg


def torch_to_flax_backbone(sd: Mapping[str, np.ndarray], prefix: str = "",
                           num_heads: int | None = None) -> dict:
    """Backbone params from official names (``prefix`` e.g. ``'backbone.'`` is stripped)."""
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    return torch_to_flax(sd, num_heads, with_head=False)[0]["backbone"]


def torch_to_flax_head(sd: Mapping[str, np.ndarray], prefix: str = "head.") -> dict:
    """DINOHead params from official ``mlp.*``/``last_layer.*`` names under ``prefix``."""
    hs = {"head." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    cfg = detect_head_config(hs)
    if cfg is None:
        raise ConversionError(f"no head tensors under prefix {prefix!r}")
    head = {}
    for tn, fp, kind in _head_mapping(cfg["nlayers"]):
        if tn not in hs:
            raise ConversionError(f"missing keys: {tn}")
        _set(head, fp, _to_flax(np.asarray(hs[tn], np.float32), kind))
    return head


def flax_to_torch_backbone(params, prefix: str = "") -> dict[str, np.ndarray]:
    """Official backbone names -> arrays (what ``vit_*().load_state_dict(strict=True)`` takes)."""
    depth = sum(1 for k in params if re.fullmatch(r"blocks_\d+", k))
    qkv_bias = "bias" in params["blocks_0"]["attn"]["qkv"]
    variant = dict(
        num_register_tokens=params["register_tokens"].shape[1] if "register_tokens" in params else 0,
        mask_token="mask_token" in params, layerscale_init=1.0 if "ls1" in params["blocks_0"] else 0.0,
        ffn="swiglu" if "w12" in params["blocks_0"]["mlp"] else "mlp")
    return {prefix + tn: _to_torch(np.asarray(_get(params, fp)), kind)
            for tn, fp, kind in _backbone_mapping(depth, qkv_bias, variant)}


def flax_to_torch_head(params, prefix: str = "head.") -> dict[str, np.ndarray]:
    nlayers = sum(1 for k in params if re.fullmatch(r"mlp_\d+", k))
    return {prefix + tn[len("head."):]: _to_torch(np.asarray(_get(params, fp)), kind)
            for tn, fp, kind in _head_mapping(nlayers)}


def write_pth(state_dict: Mapping, path: str) -> None:
    """Save {name: array} (or nested dicts of them) as a torch ``.pth``, atomically."""
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:
        raise ConversionError("writing a .pth needs PyTorch: pip install 'dino_jax[torch]'") from e

    def conv(o):
        if isinstance(o, Mapping):
            return {k: conv(v) for k, v in o.items()}
        return torch.from_numpy(np.array(o, np.float32, copy=True))

    buf = io.BytesIO()  # one whole write: a temporary file renamed locally, one object on gs://
    torch.save(conv(state_dict), buf)
    paths.write_bytes(path, buf.getvalue())
