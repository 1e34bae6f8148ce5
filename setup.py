"""Build script: the Python package plus the pybind11 extension ``fastdiff._C`` built by CMake.

Nothing here imports torch. The extension is plain C++ (StepPlan parser/validator and the CPU
reference of the linear-combination update), so the build needs only a C++17 compiler,
CMake and pybind11.

Environment:
  FASTDIFF_SKIP_EXT=1   install the pure-Python package without building the extension;
                        ``fastdiff info`` then reports that it was skipped on purpose.
  FASTDIFF_BUILD_TYPE   CMake build type (default Release).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _write_build_info(package_dir: Path, status: str) -> None:
    package_dir.mkdir(parents=True, exist_ok=True)
    (package_dir / "_build_info.py").write_text(
        '"""Written by setup.py at build time: what happened to the C++ extension."""\n'
        f"EXTENSION_STATUS = {status!r}\n"
    )


class CMakeBuild(build_ext):
    def _package_dir(self) -> Path:
        if self.inplace:
            return ROOT / "python" / "fastdiff"
        return Path(self.build_lib) / "fastdiff"

    def run(self):
        if os.environ.get("FASTDIFF_SKIP_EXT") == "1":
            print("fastdiff: FASTDIFF_SKIP_EXT=1, not building the C++ extension fastdiff._C")
            _write_build_info(self._package_dir(), "skipped at build time (FASTDIFF_SKIP_EXT=1)")
            return
        super().run()
        _write_build_info(self._package_dir(), "built")

    def build_extension(self, ext: Extension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError(
                "fastdiff: CMake (>= 3.18) is needed to build the C++ extension fastdiff._C but "
                "was not found on PATH. Install it (apt install cmake, or pip install cmake), or "
                "install without the extension: FASTDIFF_SKIP_EXT=1 pip install ."
            )
        try:
            import pybind11
        except ImportError as exc:  # build isolation normally provides it (pyproject.toml)
            raise RuntimeError("fastdiff: pybind11 is needed to build fastdiff._C: pip install pybind11") from exc

        ext_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("FASTDIFF_BUILD_TYPE", "Release")
        configure = [
            cmake,
            str(ROOT),
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DFASTDIFF_PYTHON_MODULE_DIR={ext_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DFASTDIFF_BUILD_PYTHON=ON",
            "-DFASTDIFF_BUILD_TESTS=OFF",
        ]
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run(configure, cwd=build_temp, check=True)
        subprocess.run(
            [cmake, "--build", ".", "--target", "_C", "--parallel", jobs],
            cwd=build_temp,
            check=True,
        )


setup(
    ext_modules=[CMakeExtension("fastdiff._C")],
    cmdclass={"build_ext": CMakeBuild},
)
