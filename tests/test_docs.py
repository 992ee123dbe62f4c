"""The docs stay true: every config field is on the configs page (generated from
config_defaults.py), every relative link resolves, every ``python -m dino_jax...``
program they show answers --help, the front page stays a front page, and the
quickstart's data falls back from Debian's IDX files to TFDS."""
import glob
import gzip
import importlib.util
import os
import re
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from dino_jax.config_defaults import base_config
from dino_jax.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
# Pages that show commands and link to each other, beside README.md and docs/.
OTHER_PAGES = [os.path.join(REPO, p) for p in ("benchmarks/README.md", "colabs/README.md")]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
MODULE = re.compile(r"python3? -m (dino_jax(?:\.\w+)+)")


def load_generator():
    spec = importlib.util.spec_from_file_location("make_config_docs", os.path.join(REPO, "docs", "make_config_docs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def flat(cfg, prefix=""):
    out = []
    for k, v in cfg.items():
        out += flat(v, f"{prefix}{k}.") if hasattr(v, "items") else [prefix + k]
    return out


def test_configs_page_lists_every_field_and_is_generated():
    page = open(os.path.join(REPO, "docs", "configs.md")).read()
    missing = [f for f in flat(base_config()) if f"| `{f}` |" not in page]
    assert not missing, f"fields missing from docs/configs.md (run python docs/make_config_docs.py): {missing}"
    gen = load_generator()
    assert page == gen.render(), "docs/configs.md is stale: run python docs/make_config_docs.py"
    # Every field has a comment in config_defaults.py, so every row says what the field is.
    empty = [f for _, f, c in gen.field_comments() if not c]
    assert not empty, empty


def test_config_overrides_shown_name_real_fields():
    fields = set(flat(base_config()))
    shown = {f for p in DOCS + OTHER_PAGES for f in re.findall(r"--config\.([\w.]+)=", open(p).read())} - {"FIELD"}
    assert "batch_size" in shown
    assert not shown - fields, f"--config.* overrides in the docs that are not config fields: {sorted(shown - fields)}"


def test_generator_reads_trailing_continued_and_block_comments():
    src = '''
def base_config():
    c = ml_collections.ConfigDict()
    # ---------------- model ----------------
    c.model = ml_collections.ConfigDict()
    c.model.a = 1          # first line
                           # continued
    # a block above b
    c.model.b = (1,
                 2)        # b's own
    c.blk = ml_collections.ConfigDict(dict(
        x=0,               # x comment
        y="", z=2,         # shared
    ))
    return c
'''
    got = load_generator().field_comments(src)
    assert got == [("model", "model.a", "first line continued"),
                   ("model", "model.b", "a block above b b's own"),
                   ("model", "blk.x", "x comment"), ("model", "blk.y", "shared"), ("model", "blk.z", "shared")]


def _links(path):
    text = open(path).read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code blocks are not links
    return LINK.findall(text)


@pytest.mark.parametrize("page", DOCS + OTHER_PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(page):
    bad = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto, in-page anchors
        path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
        if not os.path.exists(path):
            bad.append(target)
    assert not bad, f"{os.path.relpath(page, REPO)}: links that do not resolve: {bad}"


def test_docs_link_every_docs_page_from_the_readme():
    readme_links = {os.path.normpath(t.split("#")[0]) for t in _links(DOCS[0])}
    pages = {os.path.relpath(p, REPO) for p in DOCS[1:]}
    assert pages <= readme_links, f"docs pages the README's map does not link: {sorted(pages - readme_links)}"


def shown_commands():
    """{(module, subcommand or ''): set of --flags shown with it} over every page
    (continuation lines joined, comments dropped; --config.* overrides are config
    fields, which the configs page checks)."""
    shown = {}
    for page in DOCS + OTHER_PAGES:
        text = open(page).read().replace("\\\n", " ")
        for m in re.finditer(r"python3? -m (dino_jax(?:\.\w+)+)([^\n`|]*)", text):
            rest = m.group(2).split(" #")[0]
            sub = re.match(r"\s+([a-z]\w*2\w*)\b", rest)   # convert's torch2jax / jax2torch
            flags = {f for f in re.findall(r"(?<![\w-])--([a-z]\w*)", rest)}
            shown.setdefault((m.group(1), sub.group(1) if sub else ""), set()).update(flags)
    return shown


def test_every_program_shown_answers_help():
    shown = shown_commands()
    programs = sorted(shown)
    assert ("dino_jax.main", "") in programs and ("dino_jax.convert", "torch2jax") in programs
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, DINO_JAX_NO_TCMALLOC="1")

    def run(program):
        module, sub = program
        r = subprocess.run([sys.executable, "-m", module, *([sub] if sub else []), "--help"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
        return program, r.returncode, r.stdout + r.stderr

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, programs))
    # argparse exits 0 after --help; absl exits 1 by design, after its usage and "Try --helpfull".
    bad = [(m, rc, out[-300:]) for m, rc, out in results
           if not (rc == 0 or (rc == 1 and "Try --helpfull" in out)) or "Traceback" in out or " --" not in out]
    assert not bad, bad
    # Every flag a page shows with a program is one the program has.
    unknown = [(m, f) for m, _, out in results for f in sorted(shown[m])
               if not re.search(rf"(?<![\w-])--(\[no\])?{f}\b", out)]
    assert not unknown, f"flags shown in the docs that the program's --help does not list: {unknown}"


def test_front_page_is_a_front_page():
    readme = open(DOCS[0]).read()
    assert len(readme.splitlines()) <= 250
    # The first two commands: the quickstart, then the tests.
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert "dino_jax.main --config=configs/quickstart.py" in blocks[0]
    assert "pytest" in blocks[1]
    for name in ("LICENSE", "CITATION.cff"):
        assert os.path.exists(os.path.join(REPO, name)) and name in readme
    assert "Apache License" in open(os.path.join(REPO, "LICENSE")).read()


@pytest.mark.parametrize("page", DOCS + OTHER_PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_pages_speak_of_the_project_not_of_its_development(page):
    text = open(page).read()
    # (character classes keep this file itself free of the strings it looks for)
    hits = re.findall(r"\bstop \d+|\bissue \d+|/wor[k]/|/tmp/tven[v]|\.devki[t]|/roo[t]/|github\.com/OWNE[R]", text)
    assert not hits, f"{os.path.relpath(page, REPO)}: {hits}"


# ------------------------------------------------------------------
# The quickstart's data: Debian's IDX files, else TFDS fashion_mnist.
# ------------------------------------------------------------------
def _write_idx(folder, split, n):
    images = (np.arange(n * 28 * 28) % 251).astype(np.uint8).reshape(n, 28, 28)
    labels = (np.arange(n) % 10).astype(np.uint8)
    stems = sources._IDX_FILES[split]
    for stem, arr, code in ((stems[0], images, 3), (stems[1], labels, 1)):
        header = struct.pack(">HBB", 0, 8, code) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
        with gzip.open(os.path.join(folder, stem + ".gz"), "wb") as f:
            f.write(header + arr.tobytes())
    return images, labels


def _cfg(path):
    c = base_config().data
    c.source, c.path, c.tfds_data_dir = "fashion_mnist", path, "tfds_dir"
    return c


def test_fashion_mnist_falls_back_to_tfds_only_where_debian_files_are_absent(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    debian.mkdir()
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", str(debian))
    calls = []
    tfds_images = np.full((7, 28, 28), 9, np.uint8)

    def fake_tfds(split, data_dir):   # stands in for the download: what TFDS returns, as arrays
        calls.append((split, data_dir))
        return tfds_images, np.arange(7, dtype=np.int32) % 3

    monkeypatch.setattr(sources, "tfds_fashion_mnist", fake_tfds)
    # Debian's folder without the files: TFDS, in the configured data_dir, for the base split.
    for path in ("", str(debian)):
        src = sources.make_source(_cfg(path), "test[2:]")
        assert src.num_examples == 5 and src.num_classes == 3
    assert calls == [("test", "tfds_dir")] * 2
    # With the IDX files there, they are read and TFDS is not asked.
    images, labels = _write_idx(str(debian), "test", 4)
    src = sources.make_source(_cfg(""), "test")
    assert src.num_examples == 4 and len(calls) == 2
    np.testing.assert_array_equal(src.images.numpy()[..., 0], images)
    # A folder the user named is never replaced by a download.
    with pytest.raises(sources.DataError, match="does not exist"):
        sources.make_source(_cfg(str(tmp_path / "mine")), "test")
    assert len(calls) == 2


def test_fashion_mnist_offline_error_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", str(tmp_path))

    def offline(split, data_dir):
        raise ConnectionError("Failed to resolve 'fashion-mnist.s3-website.eu-central-1.amazonaws.com'\nmore")

    monkeypatch.setattr(sources, "tfds_fashion_mnist", offline)
    with pytest.raises(sources.DataError) as e:
        sources.make_source(_cfg(""), "train")
    msg = str(e.value)
    assert "\n" not in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "TFDS" in msg and "tfds_dir" in msg
    assert "Failed to resolve" in msg
