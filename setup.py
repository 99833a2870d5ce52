"""Generates the gRPC code from protos/ into the wheel at build time (it is never committed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        super().run()
        spec = importlib.util.spec_from_file_location("codegen", "ledger/api/codegen.py")
        assert spec is not None and spec.loader is not None
        codegen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(codegen)
        codegen.generate(Path(self.build_lib) / "ledger" / "api" / "gen")


setup(cmdclass={"build_py": BuildPyWithProtos})
