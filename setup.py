"""The wheel carries the CUDA sources and their build description, so that an installed package
can build its extension (`negkernels build-ext`, or on first use on a GPU machine) without a
source checkout. They live at the source root (csrc/, CMakeLists.txt); build_py copies them into
the package as negkernels/_build_src/. Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SOURCE_SUFFIXES = (".cu", ".cpp", ".h", ".cuh", ".in")


class build_py_with_cuda_sources(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "negkernels" / "_build_src"
        (target / "csrc").mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "CMakeLists.txt", target / "CMakeLists.txt")
        for source in sorted((ROOT / "csrc").iterdir()):
            if source.suffix in SOURCE_SUFFIXES:
                shutil.copy2(source, target / "csrc" / source.name)


setup(cmdclass={"build_py": build_py_with_cuda_sources})
