"""The gRPC frontend: services, health, reflection, and the live replica it serves from."""

from factpatch.server.app import Server, build_server

__all__ = ["Server", "build_server"]
