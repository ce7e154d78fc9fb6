"""Python code generated from ``proto/`` — by the build, never by hand.

A wheel (``pip install .``) gets it from setup.py's build step; a source checkout (``pip install
-e .``) from the first import, and again whenever a ``.proto`` file changes.

``ensure_generated()`` runs ``grpc_tools.protoc`` when the generated modules are missing or older
than the ``.proto`` files (a stamp holds the sha256 of every proto file and the grpcio-tools
version), writing into a temporary folder that is renamed into place under a file lock, so that
concurrent processes never see half a package.  ``make venv`` calls it once; importing
``factpatch.rpc`` calls it again (a hash check when nothing changed).
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # factpatch/
PROTO_DIR = PACKAGE_DIR.parent / "proto"
GEN_DIR = PACKAGE_DIR / "_gen"
PROTOS = ("inference/grpc_service.proto", "factpatch/v1/factpatch.proto")


def _stamp() -> str:
    import grpc_tools

    h = hashlib.sha256(getattr(grpc_tools, "__version__", "?").encode())
    for name in PROTOS:
        h.update(name.encode())
        h.update((PROTO_DIR / name).read_bytes())
    return h.hexdigest()


def ensure_generated() -> None:
    if not PROTO_DIR.is_dir():  # an installed wheel ships the generated code instead
        if (GEN_DIR / "STAMP").exists():
            return
        raise RuntimeError(f"no proto/ beside the package ({PROTO_DIR}) and no generated code")
    stamp = _stamp()
    if _current(stamp):
        return
    GEN_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(PACKAGE_DIR / ".codegen.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _current(stamp):
            generate_into(PACKAGE_DIR, stamp)


def _current(stamp: str) -> bool:
    path = GEN_DIR / "STAMP"
    return path.exists() and path.read_text() == stamp


def generate_into(package_dir: Path, stamp: str | None = None) -> None:
    """Write ``package_dir/_gen`` from ``proto/`` (also used by setup.py when building a wheel,
    so that an installed package carries its generated code and needs no ``proto/``)."""
    from grpc_tools import protoc

    stamp = stamp or _stamp()
    gen_dir = package_dir / "_gen"
    tmp_root = Path(tempfile.mkdtemp(prefix=".gen-", dir=package_dir))
    try:
        # Map proto/ to the virtual path factpatch/_gen so that generated imports read
        # "from factpatch._gen.inference import grpc_service_pb2".
        include = Path(protoc.__file__).resolve().parent / "_proto"
        args = [
            "protoc",
            f"-Ifactpatch/_gen={PROTO_DIR}",
            f"-I{include}",
            f"--python_out={tmp_root}",
            f"--pyi_out={tmp_root}",
            f"--grpc_python_out={tmp_root}",
            *(f"factpatch/_gen/{name}" for name in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTOS}")
        out = tmp_root / "factpatch" / "_gen"
        for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
            (folder / "__init__.py").touch()
        (out / "STAMP").write_text(stamp)
        old = package_dir / f".gen-old-{stamp[:8]}"
        if gen_dir.exists():
            gen_dir.rename(old)
        out.rename(gen_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


if __name__ == "__main__":
    ensure_generated()
    print(f"generated {GEN_DIR}", file=sys.stderr)
