"""Optimiser: PyTorch AdamW semantics, masks, per-tensor clip, last-layer freeze.

Compared with torch.optim.AdamW run the way main_dino.py runs it (two param
groups from get_params_groups, lr/wd set per step, grad=None on the frozen last
layer, weight_g without requires_grad).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dino_jax import optim

torch = pytest.importorskip("torch")


def _params(rng):
    return {
        "backbone": {
            "cls_token": rng.normal(size=(1, 1, 4)).astype(np.float32),
            "norm": {"scale": (1 + 0.1 * rng.normal(size=(4,))).astype(np.float32),
                     "bias": rng.normal(size=(4,)).astype(np.float32)},
            "fc": {"kernel": rng.normal(size=(4, 5)).astype(np.float32),
                   "bias": rng.normal(size=(5,)).astype(np.float32)},
        },
        "head": {
            "mlp_0": {"kernel": rng.normal(size=(5, 3)).astype(np.float32),
                      "bias": rng.normal(size=(3,)).astype(np.float32)},
            "last_layer": {"weight_g": np.ones((1, 6), np.float32),
                           "weight_v": rng.normal(size=(3, 6)).astype(np.float32)},
        },
    }


def _paths(tree):
    return {"/".join(str(k.key) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_masks():
    p = _params(np.random.default_rng(0))
    d = _paths(optim.decay_mask(p))
    assert d == {"backbone/cls_token": True, "backbone/norm/scale": False, "backbone/norm/bias": False,
                 "backbone/fc/kernel": True, "backbone/fc/bias": False, "head/mlp_0/kernel": True,
                 "head/mlp_0/bias": False, "head/last_layer/weight_g": True,
                 "head/last_layer/weight_v": True}
    ll = _paths(optim.last_layer_mask(p))
    assert [k for k, v in ll.items() if v] == ["head/last_layer/weight_g", "head/last_layer/weight_v"]
    tr = _paths(optim.trainable_mask(p, norm_last_layer=True))
    assert [k for k, v in tr.items() if not v] == ["head/last_layer/weight_g"]
    assert all(_paths(optim.trainable_mask(p, norm_last_layer=False)).values())


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_optimizer_matches_torch_adamw(norm_last_layer):
    rng = np.random.default_rng(1)
    params = _params(rng)
    names = list(_paths(params))
    clip, freeze_epochs = 0.8, 2
    lrs, wds, epochs = [1e-2, 3e-2, 2e-2, 1e-2], [0.04, 0.1, 0.2, 0.3], [0, 1, 2, 2]
    grads = [{n: (rng.normal(size=v.shape) * (3 if i % 2 else 0.1)).astype(np.float32)
              for n, v in _paths(params).items()} for i in range(len(lrs))]

    # --- torch, as main_dino.py
    tp = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in _paths(params).items()}
    if norm_last_layer:
        tp["head/last_layer/weight_g"].requires_grad = False
    reg, noreg = [], []
    for n, p in tp.items():
        if not p.requires_grad:
            continue
        (noreg if n.endswith("bias") or p.ndim == 1 else reg).append(p)
    opt = torch.optim.AdamW([{"params": reg}, {"params": noreg, "weight_decay": 0.0}])
    for lr, wd, ep, g in zip(lrs, wds, epochs, grads):
        for i, group in enumerate(opt.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd
        opt.zero_grad()
        for n, p in tp.items():
            if p.requires_grad:
                p.grad = torch.tensor(g[n])
        for n, p in tp.items():  # utils.clip_gradients
            if p.grad is not None:
                norm = p.grad.data.norm(2)
                coef = clip / (norm + 1e-6)
                if coef < 1:
                    p.grad.data.mul_(coef)
        if ep < freeze_epochs:  # utils.cancel_gradients_last_layer
            for n, p in tp.items():
                if "last_layer" in n:
                    p.grad = None
        opt.step()

    # --- ours
    tx = optim.dino_optimizer(clip_grad=clip, norm_last_layer=norm_last_layer)
    jp = jax.tree.map(jnp.asarray, params)
    state = tx.init(jp)
    ll = optim.last_layer_mask(jp)

    @jax.jit
    def step(p, s, g, lr, wd, frozen):
        upd, s = tx.update(g, s, p, learning_rate=lr, weight_decay=wd,
                           active=optim.active_mask(ll, frozen))
        return optax.apply_updates(p, upd), s

    treedef = jax.tree.structure(jp)
    for lr, wd, ep, g in zip(lrs, wds, epochs, grads):
        gt = treedef.unflatten([jnp.asarray(g[n]) for n in names])
        jp, state = step(jp, state, gt, lr, wd, ep < freeze_epochs)

    ours = _paths(jp)
    for n in names:
        np.testing.assert_allclose(ours[n], tp[n].detach().numpy(), rtol=2e-6, atol=2e-7, err_msg=n)
    # Per-parameter step counts: torch's state['step'].
    counts = _paths(optim.adamw_state(state).count)
    for n, p in tp.items():
        torch_step = int(opt.state[p]["step"]) if p in opt.state else 0
        assert int(counts[n]) == torch_step, n
    assert int(counts["head/last_layer/weight_v"]) == 2 and int(counts["backbone/fc/bias"]) == 4
    # weight_g never moves when frozen by norm_last_layer.
    if norm_last_layer:
        assert np.all(ours["head/last_layer/weight_g"] == 1.0)


def test_clip_by_tensor_norm_is_per_tensor():
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4]), "c": jnp.zeros(3)}
    out, _ = optim.clip_by_tensor_norm(1.0).update(g, optax.EmptyState())
    np.testing.assert_allclose(out["a"], np.array([3.0, 4.0]) / (5 + 1e-6), rtol=1e-6)
    np.testing.assert_array_equal(out["b"], g["b"])   # norm 0.5 < 1: unchanged (not a global clip)
    np.testing.assert_array_equal(out["c"], g["c"])
    same, _ = optim.clip_by_tensor_norm(0.0).update(g, optax.EmptyState())
    assert same is g


def test_torch_adamw_standalone_with_schedules():
    """Callable lr/wd schedules of the update count, optax style."""
    p = {"w": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    tx = optim.torch_adamw(learning_rate=lambda s: 0.1 * (s + 1), weight_decay=0.5)
    s = tx.init(p)
    g = {"w": jnp.full((2, 2), 2.0), "bias": jnp.full(2, 2.0)}
    u, s = tx.update(g, s, p)
    # step 1: m_hat = g, v_hat = g^2 -> update = -lr * g/(|g|+eps); decay only on w.
    np.testing.assert_allclose(u["w"], -0.1 * 0.5 - 0.1 * 2 / (2 + 1e-8), rtol=1e-6)
    np.testing.assert_allclose(u["bias"], -0.1 * 2 / (2 + 1e-8), rtol=1e-6)
    u2, s = tx.update(g, s, optax.apply_updates(p, u))
    assert int(s.step) == 2
    with pytest.raises(ValueError):
        optim.torch_adamw().update(g, optim.torch_adamw().init(p), p)
