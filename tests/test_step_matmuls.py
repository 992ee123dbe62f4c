"""benchmarks/step_matmuls.py reads the products of a compiled XLA:CPU program from its
HLO text: shapes and dimension numbers of every dot outside YNNPACK fusions."""
import importlib.util
import os

import jax
import jax.numpy as jnp

from dino_jax import train

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "step_matmuls.py")


def load_script():
    spec = importlib.util.spec_from_file_location("step_matmuls", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_dots_finds_each_product_with_its_shapes_and_dimension_numbers():
    mod = load_script()
    x, w = jnp.ones((40, 24)), jnp.ones((24, 16))
    a, b = jnp.ones((6, 3, 10, 8)), jnp.ones((6, 3, 8, 5))

    def program(x, w, a, b):
        y = x @ w                                        # (40, 24) x (24, 16)
        dw = jax.lax.dot_general(x, y, (((0,), (0,)), ((), ())))  # token-contracting form
        z = jnp.einsum("bhqd,bhdk->bhqk", a, b)          # batched
        return y.sum() + dw.sum() + z.sum()

    hlo = jax.jit(program, compiler_options=train.step_compiler_options("cpu")).lower(
        x, w, a, b).compile().as_text()
    dots, in_ynn = mod.step_dots(hlo)
    found = sorted((lhs, rhs, dims["lhs_contracting_dims"], dims["rhs_contracting_dims"],
                    dims.get("lhs_batch_dims", ())) for lhs, rhs, dims in dots)
    assert found == sorted([((40, 24), (24, 16), (1,), (0,), ()),
                            ((40, 24), (40, 16), (0,), (0,), ()),
                            ((6, 3, 10, 8), (6, 3, 8, 5), (3,), (2,), (0, 1))]), found
    assert in_ynn == 0
    # torch.matmul layouts: rows then contracted axis on the left, contracted then cols on the right
    assert mod.torch_layout((40, 24), (40, 16), {"lhs_contracting_dims": (0,),
                                                 "rhs_contracting_dims": (0,)}) == ([1, 0], [0, 1])
    assert mod.torch_layout((6, 3, 10, 8), (6, 3, 8, 5),
                            {"lhs_contracting_dims": (3,), "rhs_contracting_dims": (2,),
                             "lhs_batch_dims": (0, 1), "rhs_batch_dims": (0, 1)}) == (
        [0, 1, 2, 3], [0, 1, 2, 3])


def test_products_inside_ynnpack_fusions_are_counted_apart():
    """x86-64: the attention logits' product is fused with its softmax into a YNNPACK
    fusion by the step's options; such products are counted, not listed."""
    from dino_jax.models import ops
    mod = load_script()
    q = jnp.ones((8, 3, 50, 32))  # nano's global-crop attention, 8 crops
    hlo = jax.jit(ops._attention_probs, compiler_options=train.step_compiler_options("cpu")).lower(
        q, q).compile().as_text()
    dots, in_ynn = mod.step_dots(hlo)
    assert len(dots) + in_ynn == hlo.count(" dot(")
    if "__ynn_fusion" in hlo:  # jaxlib's YNNPACK fusions (x86-64)
        assert in_ynn == 1 and dots == []
