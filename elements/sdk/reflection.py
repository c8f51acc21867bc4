"""gRPC server reflection that serves element.proto with its comments.

grpc_reflection answers from a descriptor pool, and a pool's `CopyToProto` drops the
source info (the comments) even when the file was added with it; the generated
element_pb2 never had it. So this servicer answers file requests with the
FileDescriptorProtos themselves: element.proto from elements/api/element.protoset
(written with --include_source_info by proto/generate.py), the other services' files
as their modules describe them. `grpcurl describe element.v1.DataEvent` then prints
what the proto says.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from importlib import resources
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVICE_NAME = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
PROTOSET = "element.protoset"


def _not_found(request: reflection_pb2.ServerReflectionRequest, what: str) -> reflection_pb2.ServerReflectionResponse:
    return reflection_pb2.ServerReflectionResponse(
        original_request=request,
        error_response=reflection_pb2.ErrorResponse(error_code=grpc.StatusCode.NOT_FOUND.value[0],
                                                    error_message=f"{what} not found"))


class Reflection(reflection_pb2_grpc.ServerReflectionServicer):
    """v1alpha ServerReflection over a fixed set of files (`files`: name -> FileDescriptorProto)."""

    def __init__(self, service_names: Iterable[str], files: Iterable[descriptor_pb2.FileDescriptorProto]) -> None:
        self.service_names = sorted(service_names)
        self.files = {file.name: file for file in files}
        self.pool = descriptor_pool.DescriptorPool()
        for name in self._in_dependency_order():
            self.pool.Add(self.files[name])

    def _in_dependency_order(self) -> list[str]:
        ordered: list[str] = []

        def visit(name: str) -> None:
            if name not in ordered:
                for dependency in self.files[name].dependency:
                    visit(dependency)
                ordered.append(name)
        for name in self.files:
            visit(name)
        return ordered

    async def ServerReflectionInfo(self, request_iterator: AsyncIterator[reflection_pb2.ServerReflectionRequest],  # noqa: N802
                                   context: Any) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for request in request_iterator:
            yield self.answer(request)

    def answer(self, request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
        kind = request.WhichOneof("message_request")
        if kind == "list_services":
            return reflection_pb2.ServerReflectionResponse(
                original_request=request, list_services_response=reflection_pb2.ListServiceResponse(
                    service=[reflection_pb2.ServiceResponse(name=name) for name in self.service_names]))
        if kind == "file_by_filename":
            name = request.file_by_filename
            return self._files(request, name) if name in self.files else _not_found(request, f"file {name}")
        if kind == "file_containing_symbol":
            try:
                name = self.pool.FindFileContainingSymbol(request.file_containing_symbol).name
            except KeyError:
                return _not_found(request, f"symbol {request.file_containing_symbol}")
            return self._files(request, name)
        if kind == "all_extension_numbers_of_type":
            try:
                self.pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
            except KeyError:
                return _not_found(request, f"type {request.all_extension_numbers_of_type}")
            return reflection_pb2.ServerReflectionResponse(  # none of these files declares extensions
                original_request=request, all_extension_numbers_response=reflection_pb2.ExtensionNumberResponse(
                    base_type_name=request.all_extension_numbers_of_type))
        return _not_found(request, "extension" if kind == "file_containing_extension" else "request")

    def _files(self, request: reflection_pb2.ServerReflectionRequest,
               name: str) -> reflection_pb2.ServerReflectionResponse:
        """The file and everything it imports, as the protocol asks."""
        names, pending = [], [name]
        while pending:
            current = pending.pop()
            if current not in names:
                names.append(current)
                pending += self.files[current].dependency
        return reflection_pb2.ServerReflectionResponse(
            original_request=request, file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=[self.files[n].SerializeToString() for n in names]))


def with_comments() -> list[descriptor_pb2.FileDescriptorProto]:
    """The files of elements/api/element.protoset, source info included."""
    data = resources.files("elements.api").joinpath(PROTOSET).read_bytes()
    return list(descriptor_pb2.FileDescriptorSet.FromString(data).file)


def described(*modules: ModuleType) -> list[descriptor_pb2.FileDescriptorProto]:
    """The files of generated `_pb2` modules, as their descriptors have them (no comments)."""
    files = []
    for module in modules:
        file = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file)
        files.append(file)
    return files


def add_to_server(server: grpc.aio.Server, service_names: Iterable[str],
                  files: Iterable[descriptor_pb2.FileDescriptorProto]) -> None:
    """Serves reflection of `service_names` (and of itself) from `files`."""
    servicer = Reflection([*service_names, SERVICE_NAME], [*files, *described(reflection_pb2)])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
