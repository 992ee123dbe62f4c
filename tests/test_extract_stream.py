"""``python -m dino_jax.extract`` writes its ``.npz`` as the batches come: images of
mixed sizes (CLS rows written at their index, one attention member per image),
and a failed run leaves neither the output nor a temporary file behind."""
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dino_jax import checkpoint, extract
from dino_jax.eval import common
from dino_jax.models import vit


def _ckpt(tmp_path):
    model = vit.VisionTransformer(patch_size=4, embed_dim=32, depth=2, num_heads=4, img_size=28)
    params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 28, 28, 3)))["params"]
    out = str(tmp_path / "ckpt")
    checkpoint.save_params_dir(out, {"backbone": params}, vit.model_config(model))
    return out, model, params


def test_extract_mixed_sizes_streams_every_output(tmp_path):
    path, model, params = _ckpt(tmp_path)
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    # Two sizes, interleaved by name, so the size groups are not in index order; 30x22
    # is cropped to 28x20 (a multiple of the patch).
    shapes = [(28, 28), (30, 22), (28, 28), (30, 22), (28, 28)]
    images = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in shapes]
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    out = tmp_path / "f.npz"
    assert extract.main(["--checkpoint", path, "--input", str(folder), "--output", str(out), "--attention",
                         "--batch_size", "2"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "f.npz", "images"]  # no temporary file left
    got = np.load(out)
    assert list(got["paths"]) == [f"{i:02d}.png" for i in range(5)]
    assert got["sizes"].tolist() == [[28, 28], [28, 20], [28, 28], [28, 20], [28, 28]]
    assert "attention" not in got.files
    for i, im in enumerate(images):
        x = jnp.asarray(common.crop_to_patch_multiple(common.normalize_uint8(im), 4)[None])
        want = np.asarray(model.apply({"params": params}, x))[0]
        np.testing.assert_allclose(got["cls"][i], want, rtol=0, atol=1e-5)
        att = np.asarray(model.apply({"params": params}, x, method="get_last_selfattention"))[0, :, 0, 1:]
        h, w = x.shape[1] // 4, x.shape[2] // 4
        np.testing.assert_allclose(got[f"attention/{i}"], att.reshape(4, h, w), rtol=0, atol=1e-6)


def test_extract_failure_leaves_no_file(tmp_path, capsys):
    path, _, _ = _ckpt(tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not an image")
    out = tmp_path / "f.npz"
    assert extract.main(["--checkpoint", path, "--input", str(folder), "--output", str(out),
                         "--image_size", "28"]) == 1
    assert "b.png" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "images"]
