"""Process set-up that must happen before JAX (or TensorFlow) is imported.

Imports nothing heavy: entry points call these first thing.

- :func:`set_xla_cpu_defaults`: the one place for XLA:CPU flag defaults
  (``XLA_CPU_DEFAULTS``), added to ``XLA_FLAGS`` unless it already names them.
  None is set: the flags tried (benchmarks/README.md) gave no gain on the train
  step.
- :func:`reexec_with_tcmalloc`: with glibc's malloc, XLA:CPU's per-step
  temporary buffers (tens of MB, above glibc's largest mmap threshold) are
  mapped and unmapped on every step, and the page faults of re-mapping them
  take a large share of a small step's time; tcmalloc keeps the memory
  (benchmarks/README.md). When Debian's ``libtcmalloc-minimal4`` is installed
  and nothing is preloaded, the process re-executes itself once with it in
  ``LD_PRELOAD`` (same PID: signals and parents are unaffected).
  ``DINO_JAX_NO_TCMALLOC=1`` turns this off.
"""
from __future__ import annotations

import ctypes.util
import os
import sys

_REEXEC_MARK = "DINO_JAX_TCMALLOC_REEXEC"


# XLA:CPU flags set unless XLA_FLAGS already names them (none: see the module doc).
XLA_CPU_DEFAULTS: dict[str, str] = {}


def set_xla_cpu_defaults() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f"--{k}={v}" for k, v in XLA_CPU_DEFAULTS.items() if k not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


def tcmalloc_library() -> str | None:
    """The tcmalloc shared library the dynamic loader can find (None if not installed)."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        lib = ctypes.util.find_library(name)
        if lib:
            return lib
    return None


def reexec_with_tcmalloc() -> None:
    """Re-execute this Python command line (``sys.orig_argv``) with tcmalloc preloaded
    (see module doc). Returns normally when it does not apply: already preloaded or
    re-executed, disabled, or tcmalloc not installed."""
    env = os.environ
    if env.get("DINO_JAX_NO_TCMALLOC") or env.get(_REEXEC_MARK) or "LD_PRELOAD" in env:
        return
    lib = tcmalloc_library()
    if lib is None or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    new_env = {**env, "LD_PRELOAD": lib, _REEXEC_MARK: "1"}
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], new_env)
    except OSError:  # could not exec: carry on with glibc's malloc
        return
