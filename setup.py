"""Build step: generate the gRPC modules from proto/ into the wheel (factpatch/_gen).

Everything else about the package is in pyproject.toml.  Editable installs generate on import
instead (factpatch/rpc/codegen.py), so that editing a .proto file takes effect at once.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithGrpc(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        spec = importlib.util.spec_from_file_location("codegen", ROOT / "factpatch/rpc/codegen.py")
        codegen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(codegen)
        codegen.generate_into(Path(self.build_lib) / "factpatch")


setup(cmdclass={"build_py": BuildPyWithGrpc})
