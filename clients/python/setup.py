"""Builds sluice-client: generates the gRPC stubs from Sluice's proto/ at build time.

The proto files live at the repository's top (../../proto); `pip install ./clients/python` from
a checkout builds from here. The generated modules go into the built package as
`sluice_client._proto` (their one absolute import is made relative), never into the source tree.
"""

import os
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
PROTO = "sluice/v1/broker.proto"


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        from grpc_tools import protoc  # a build requirement (pyproject.toml)
        import grpc_tools

        if not os.path.exists(os.path.join(PROTO_ROOT, PROTO)):
            raise RuntimeError(f"{PROTO} not found under {PROTO_ROOT}: build from a Sluice checkout")
        well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        out = tempfile.mkdtemp()
        try:
            code = protoc.main([
                "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
                f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", PROTO,
            ])
            if code != 0:
                raise RuntimeError(f"protoc failed ({code}) on {PROTO}")
            target = os.path.join(self.build_lib, "sluice_client", "_proto")
            os.makedirs(target, exist_ok=True)
            for name in ("broker_pb2.py", "broker_pb2.pyi", "broker_pb2_grpc.py"):
                with open(os.path.join(out, "sluice", "v1", name)) as f:
                    text = f.read()
                text = text.replace("from sluice.v1 import broker_pb2", "from . import broker_pb2")
                with open(os.path.join(target, name), "w") as f:
                    f.write(text)
        finally:
            shutil.rmtree(out, ignore_errors=True)


setup(cmdclass={"build_py": BuildWithStubs})
