"""gRPC messages and stubs, generated from ``proto/`` (see codegen.py)."""

from factpatch.rpc.codegen import ensure_generated

ensure_generated()

from factpatch._gen.factpatch.v1 import factpatch_pb2 as pb  # noqa: E402
from factpatch._gen.factpatch.v1 import factpatch_pb2_grpc as pb_grpc  # noqa: E402
from factpatch._gen.inference import grpc_service_pb2 as oip  # noqa: E402
from factpatch._gen.inference import grpc_service_pb2_grpc as oip_grpc  # noqa: E402

__all__ = ["oip", "oip_grpc", "pb", "pb_grpc"]
