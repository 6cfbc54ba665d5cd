"""The compiled CUDA extension: find it, build it with CMake + Ninja, load it. Never breaks import.

The one build description is ``CMakeLists.txt`` at the source root; this module only drives it.
Builds land in a cache folder keyed by the sources, torch, CUDA and Python versions, so a rebuild
happens only when one of those changes. A file lock makes two processes that start at once build
it once.

Policy:
  * ``NEGKERNELS_DISABLE_CUDA_EXT=1``: never load or build.
  * Otherwise a cached build is loaded on first use. If there is none, it is built on first use
    only when torch is a CUDA build and a GPU is visible (a CPU torch never triggers a build), or
    when :func:`build` is called explicitly (``negkernels build-ext``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

MODULE_NAME = "_negkernels_cuda"


def _source_root() -> Path:
    """The folder that holds ``CMakeLists.txt`` and ``csrc/``: the copy an installed wheel carries
    (negkernels/_build_src, written by setup.py's build_py), else the source checkout above the
    package (an editable install)."""
    package = Path(__file__).resolve().parent
    for root in (package / "_build_src", package.parent):
        if (root / "CMakeLists.txt").is_file() and (root / "csrc").is_dir():
            return root
    return package.parent


SOURCE_ROOT = _source_root()

_state: dict = {"module": None, "error": None, "tried": False}


def disabled() -> bool:
    return os.environ.get("NEGKERNELS_DISABLE_CUDA_EXT", "0") not in ("", "0")


def cache_root() -> Path:
    root = os.environ.get("NEGKERNELS_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "negkernels"


def source_files() -> list[Path]:
    csrc = SOURCE_ROOT / "csrc"
    if not csrc.is_dir() or not (SOURCE_ROOT / "CMakeLists.txt").is_file():
        return []
    return sorted(p for p in csrc.iterdir() if p.suffix in (".cu", ".cpp", ".h", ".cuh"))


def build_key(cuda_archs: str) -> str:
    h = hashlib.sha256()
    for p in [SOURCE_ROOT / "CMakeLists.txt", *source_files()]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(f"{torch.__version__}|{torch.version.cuda}|{sys.version_info[:2]}|{cuda_archs}".encode())
    return h.hexdigest()[:16]


def default_archs() -> str:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}{minor}"
    return "90"


def _built_module_path(key: str) -> Path:
    return cache_root() / f"ext-{key}" / f"{MODULE_NAME}.so"


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(cuda_archs: str | None = None, build_dir: Path | None = None, verbose: bool = False) -> Path:
    """Configure and build the extension with CMake + Ninja; return the path of the built module.

    Raises ``RuntimeError`` with the build log when the build fails.
    """
    if not source_files():
        raise RuntimeError(
            f"no csrc/ and CMakeLists.txt under {SOURCE_ROOT}: this install carries no CUDA sources "
            "(install the negkernels wheel or sdist, or a source checkout with pip install -e .)"
        )
    for tool in ("cmake", "nvcc"):
        if shutil.which(tool) is None and not (tool == "nvcc" and os.environ.get("CUDACXX")):
            raise RuntimeError(f"building the CUDA extension needs `{tool}` on PATH")
    archs = cuda_archs or default_archs()
    key = build_key(archs)
    target = _built_module_path(key)
    with _file_lock(target.parent.parent / f"ext-{key}.lock"):
        if target.exists():
            return target
        bdir = Path(build_dir) if build_dir else target.parent / "build"
        bdir.mkdir(parents=True, exist_ok=True)
        try:
            import pybind11
        except ImportError:
            raise RuntimeError(
                "building the CUDA extension needs pybind11 and ninja: pip install 'negkernels[build]'"
            ) from None

        configure = [
            "cmake",
            "-S",
            str(SOURCE_ROOT),
            "-B",
            str(bdir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            "-DNEGKERNELS_WITH_CUDA=ON",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        for cmd in (configure, ["cmake", "--build", str(bdir), "--parallel"]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if verbose:
                print(proc.stdout, proc.stderr, file=sys.stderr)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"CUDA extension build failed: {' '.join(cmd)}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
                )
        built = next(iter(sorted(bdir.glob(f"{MODULE_NAME}*.so"))), None)
        if built is None:
            raise RuntimeError(f"CMake finished but produced no {MODULE_NAME}*.so in {bdir}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".so.tmp")
        shutil.copy2(built, tmp)
        os.replace(tmp, target)  # atomic: a concurrent loader sees the whole file or none
    return target


def import_module_from(path: Path):
    # Importing registers the TORCH_LIBRARY ops; torch must be loaded first (it is).
    spec = importlib.util.spec_from_file_location(MODULE_NAME, str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _may_build_on_first_use() -> bool:
    return torch.version.cuda is not None and torch.cuda.is_available() and shutil.which("nvcc") is not None


def load():
    """Return the loaded extension module, or ``None`` (see :func:`load_error` for why)."""
    if _state["tried"]:
        return _state["module"]
    _state["tried"] = True
    if disabled():
        _state["error"] = "disabled by NEGKERNELS_DISABLE_CUDA_EXT"
        return None
    try:
        path = _built_module_path(build_key(default_archs())) if source_files() else None
        if path is None or not path.exists():
            if not _may_build_on_first_use():
                _state["error"] = (
                    "not built (run `negkernels build-ext` on a machine with a CUDA build of torch and nvcc)"
                )
                return None
            print("negkernels: building the CUDA extension (first use; cached afterwards)...", file=sys.stderr)
            path = build()
        _state["module"] = import_module_from(path)
    except Exception as exc:  # a broken toolchain must not break `import negkernels`
        _state["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        _state["module"] = None
    return _state["module"]


def load_error() -> str | None:
    return _state["error"]


def has_cuda_ext() -> bool:
    return load() is not None


def cuda_ops() -> frozenset[str]:
    module = load()
    if module is None:
        return frozenset()
    return frozenset(module.implemented_ops())


def policy_loss_fwd(logp, old_logp, advantages, mask, ref_logp, is_weights, cu_seqlens, codes, scalars):
    """The CUDA policy-loss kernel behind the same interface as ``negkernels.triton.logprobs.policy_loss_fwd``
    (``codes`` / ``scalars`` are passed on as the lists csrc/logprobs.h indexes by slot)."""
    load()  # registers torch.ops.negkernels_cuda
    dtypes = {t.dtype for t in (logp, old_logp, advantages, ref_logp, is_weights) if t is not None}
    common = logp.dtype if len(dtypes) == 1 else torch.float32

    def values(t):
        return None if t is None else t.to(common).reshape(-1).contiguous()

    return torch.ops.negkernels_cuda.policy_loss(
        values(logp),
        values(old_logp),
        values(advantages),
        mask,
        values(ref_logp),
        values(is_weights),
        cu_seqlens.long().contiguous() if cu_seqlens is not None else None,
        list(codes),
        list(scalars),
        torch.cuda.current_stream(logp.device).cuda_stream,
    )


def select_retained(scores, log_beta, positions, step, budget, sink, window, lengths):
    """The CUDA radix-select kernel: kept indices [B, H, min(budget, S)] from fp32 ``scores`` or, fused,
    from ``log_beta``, ``positions`` (broadcast view) and ``step`` (int or [B] tensor)."""
    load()  # registers torch.ops.negkernels_cuda
    device = (scores if scores is not None else log_beta).device
    step_tensor = step if isinstance(step, torch.Tensor) else None
    return torch.ops.negkernels_cuda.select_retained(
        scores,
        log_beta,
        positions,
        step_tensor,
        0 if step is None or step_tensor is not None else int(step),
        budget,
        sink,
        window,
        lengths,
        torch.cuda.current_stream(device).cuda_stream,
    )
