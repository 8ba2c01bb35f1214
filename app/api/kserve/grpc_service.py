"""``inference.GRPCInferenceService`` (the Open Inference Protocol over gRPC) on ``GRPC_PORT``,
served by grpcio's asyncio server in the HTTP app's own process and event loop, over the same
service, batcher and limits as ``/infer``.

Inputs come as ``raw_input_contents`` (what tritonclient sends) or typed ``contents``; outputs
always go as ``raw_output_contents``. Requests are admitted by memory cost as ``/infer``'s are
(:mod:`app.api.dataplane`), priced as one message built whole. Errors are status codes with the
same messages as over HTTP: 400 -> INVALID_ARGUMENT, 404 -> NOT_FOUND, 413 (an answer that could
never fit in the memory budget) -> RESOURCE_EXHAUSTED, 503 (not ready, queue or budget taken) ->
UNAVAILABLE, 504 -> DEADLINE_EXCEEDED; messages past ``MAX_BODY_BYTES`` get RESOURCE_EXHAUSTED
from grpcio itself. Each call takes the
caller's ``x-request-id`` metadata (or a new id) and sends it back as initial metadata. On
shutdown (:class:`GrpcServer`) new calls get UNAVAILABLE while those in flight finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from app import __version__
from app.api.dataplane import BodyHold, copied, parsed, served
from app.api.errors import ApiError
from app.api.json_body import PARSED, most_values, parsed_bytes
from app.api.kserve import SERVER_NAME, served_extensions
from app.api.kserve import grpc_predict_v2_pb2 as pb
from app.api.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from app.api.kserve import repository as model_repository
from app.api.kserve.admin import AdminGate
from app.api.kserve.answers import AnswerPlan
from app.api.kserve.inference import Decoded, admitted, decoded
from app.api.kserve.signature import (
    OUTPUT_NAMES,
    gathered_tensors,
    input_specs,
    model_metadata,
    output_specs,
)
from app.api.kserve.tensors import (
    Tensor,
    as_little_endian_bytes,
    invalid,
    tensor_from_bytes,
    tensor_from_values,
)
from app.api.middleware import request_id_from
from app.config import Settings
from app.service.model_service import Lease
from app.service.pricing import DEFAULT_BUDGET
from app.service.repository import Repository
from app.spec import ModelInput
from app.system import cgroup_memory_limit

log = logging.getLogger("app.access")
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 422: grpc.StatusCode.INVALID_ARGUMENT,
                501: grpc.StatusCode.UNIMPLEMENTED, 503: grpc.StatusCode.UNAVAILABLE,
                504: grpc.StatusCode.DEADLINE_EXCEEDED}
SERVICE = "inference.GRPCInferenceService"
DECODED_BYTES_PER_MESSAGE_BYTE = 8
UNPRICED_MESSAGE_COPIES = 4
QUIET_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})  # probes: not logged
# A raw_output_contents field's key: its number, and wire type 2 (length-delimited).
_RAW_CONTENTS = pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"]
RAW_CONTENTS_KEY = bytes([_RAW_CONTENTS.number << 3 | 2])
ANSWER_LINGER_S = 0.5  # from the last call's end, before grpcio's stop closes its connection
# The typed contents field of each datatype (FP16 and BF16 only travel raw).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
            "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
            "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
            "FP32": "fp32_contents", "FP64": "fp64_contents"}

Handler = Callable[[Any, Any, aio.ServicerContext], Awaitable[Any]]


def observed(method: Handler) -> Handler:
    """A call with its request id, its ApiError as a status code, metrics and a log line."""
    name = method.__name__

    @functools.wraps(method)
    async def call(self: InferenceServicer, request: Any, context: aio.ServicerContext) -> Any:
        request_id = _request_id(context)
        await context.send_initial_metadata((("x-request-id", request_id),))
        started, code = time.perf_counter(), grpc.StatusCode.OK
        self.calls.enter()
        try:
            if self.calls.stopping:
                raise ApiError(503, "shutting_down", "the server is shutting down; retry on another")
            return await method(self, request, context)
        except ApiError as exc:
            code = STATUS_CODES.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(code, exc.message)
        except asyncio.CancelledError:  # the caller went away (its queued work is dropped)
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.UNKNOWN
            log.exception("unhandled error in gRPC %s", name, extra={"request_id": request_id})
            raise
        finally:
            self.calls.leave()
            self.record(name, code, request_id, time.perf_counter() - started, context)

    return call


class CallsInFlight:
    """The calls a servicer is answering, and whether it has stopped taking new ones."""

    def __init__(self) -> None:
        self.count = 0
        self.stopping = False
        self.last_left = -math.inf  # when the last call's handler returned (its answer then leaves)
        self._none = asyncio.Event()
        self._none.set()

    def enter(self) -> None:
        self.count += 1
        self._none.clear()

    def leave(self) -> None:
        self.count -= 1
        self.last_left = time.monotonic()
        if self.count == 0:
            self._none.set()

    async def finished(self, timeout_s: float) -> None:
        """Once no call is in flight, or ``timeout_s`` later."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none.wait(), timeout_s)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Repository, settings: Settings, gate: AdminGate) -> None:
        self.repository = repository
        self.settings = settings
        self.gate = gate
        self.metrics = repository.metrics
        self.models_of_calls: dict[int, tuple[str, str]] = {}  # by id(context): for the log line
        self.calls = CallsInFlight()

    @observed
    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    @observed
    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.repository.ready)

    @observed
    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> Any:
        try:
            served(self.repository, request.name, request.version)
        except ApiError as exc:
            if exc.status != 503:
                raise
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @observed
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__,
                                         extensions=served_extensions(self.gate.enabled))

    @observed
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: aio.ServicerContext) -> Any:
        service = served(self.repository, request.name, request.version)
        metadata = model_metadata(service, self.repository.ready_versions(request.name))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"],
            inputs=[tensor(**spec.as_dict()) for spec in input_specs(service.model_input)],
            outputs=[tensor(**spec.as_dict()) for spec in output_specs(service)])

    @observed
    async def ModelInfer(self, message: bytes, context: aio.ServicerContext) -> Any:
        """``message``: the request's bytes, priced before they are decoded; returns the answer's
        bytes (:func:`add_servicer`)."""
        repository, settings = self.repository, self.settings
        if repository.budget is None:
            raise ApiError(503, "not_ready", "not ready (loading the models)", headers={"Retry-After": "1"})
        remaining = context.time_remaining()  # the caller's deadline, when it set one
        timeout = min(settings.request_timeout_s, math.inf if remaining is None else max(remaining, 0.001))
        message_bytes = len(message)
        async with BodyHold(repository.budget, timeout, self.metrics) as hold:
            await hold.to(message_price(message_bytes, self.most_values()))
            request = await parsed(infer_request, message_bytes, message)
            del message
            service = served(repository, request.model_name, request.model_version)
            self.models_of_calls[id(context)] = service.labels
            with service.lease() as lease:
                return await self.infer_with(lease, hold, request, message_bytes, timeout, context)

    @observed
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: aio.ServicerContext) -> Any:
        self.administrator(request.repository_name, context)
        entries = await model_repository.index(self.repository, request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**entry)
                                                  for entry in entries])

    @observed
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: aio.ServicerContext) -> Any:
        self.administrator(request.repository_name, context)
        self.models_of_calls[id(context)] = (request.model_name, None)
        await model_repository.load(self.repository, request.model_name, parameter_values(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @observed
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: aio.ServicerContext) -> Any:
        self.administrator(request.repository_name, context)
        self.models_of_calls[id(context)] = (request.model_name, None)
        await model_repository.unload(self.repository, request.model_name,
                                      parameter_values(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    def administrator(self, repository_name: str, context: aio.ServicerContext) -> None:
        """The caller bears the administrators' token, and names no repository."""
        self.gate.check(_metadata(context, "authorization"))
        if repository_name:
            raise ApiError(501, "unsupported", "'repository_name' specification is not supported: "
                           "this server serves one repository (leave it empty)")

    async def infer_with(self, lease: Lease, hold: BodyHold, request: pb.ModelInferRequest,
                         message_bytes: int, timeout: float, context: aio.ServicerContext) -> bytes:
        """The decoded ``request`` run on the version ``lease`` holds; ``hold`` (the message's
        price) is let go once its inputs are decoded."""
        service, settings = lease.service, self.settings
        most = most_values(settings.max_batch, settings.max_len, service.model_input)
        async with hold:
            opened = await parsed(decoded_message, message_bytes, request, most, service.model_input,
                                  settings)
            model_id = request.id
            del request
        plan, started = await admitted(lease, opened, True, message_bytes, timeout)
        del opened
        try:
            tensors = await gathered_tensors(started.parts(), plan.batch, plan.steps, plan.widths, plan.names)
            response = await copied(infer_response, plan.total_size, service.name, str(service.version),
                                    model_id, plan, tensors)
        except BaseException:
            await started.finish()
            raise
        # grpcio sends the message once this returns: it keeps its share of the budget until
        # the call is over.
        loop = asyncio.get_running_loop()
        context.add_done_callback(lambda _: loop.call_soon_threadsafe(started.release))
        return response

    def most_values(self) -> int:
        """The most values any model's largest request holds (the message is priced before
        it names its model)."""
        settings = self.settings
        inputs = [instance.model_input for instance in self.repository.ready_instances()]
        return max((most_values(settings.max_batch, settings.max_len, model_input) for model_input in inputs),
                   default=settings.max_batch * settings.max_len)

    def record(self, method: str, code: grpc.StatusCode, request_id: str, seconds: float,
               context: aio.ServicerContext) -> None:
        self.metrics.grpc_requests.labels(method, code.name).inc()
        self.metrics.grpc_latency.labels(method).observe(seconds)
        model, version = self.models_of_calls.pop(id(context), (None, None))
        if method in QUIET_METHODS:
            return
        log.info("grpc request", extra={
            "request_id": request_id, "method": method, "status": code.name,
            "duration_ms": round(seconds * 1000, 3), "client": context.peer(),
            "model": model, "model_version": version})


def infer_response(model: str, version: str, request_id: str, plan: AnswerPlan,
                   tensors: list[Tensor]) -> bytes:
    """The answer message, serialized: the small fields by protobuf, then each tensor's bytes
    as a ``raw_output_contents`` field, joined in one copy (protobuf would take three, and
    grpcio serialize it on the event loop)."""
    output = pb.ModelInferResponse.InferOutputTensor
    head = pb.ModelInferResponse(
        model_name=model, model_version=version, id=request_id,
        outputs=[output(name=name, datatype="FP32", shape=plan.shape(name)) for name in plan.names],
    ).SerializeToString()
    pieces: list[bytes | memoryview] = [head]
    for tensor in tensors:
        data = as_little_endian_bytes(tensor.array)
        pieces += [RAW_CONTENTS_KEY + _varint(data.nbytes), data]
    return b"".join(pieces)


def _varint(value: int) -> bytes:
    """``value`` as a protobuf varint: seven bits a byte, low first, the high bit on all but the last."""
    encoded = bytearray()
    while value > 0x7F:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def message_price(message_bytes: int, most: int) -> int:
    """A ModelInfer message's bytes, its decoded form (a one-byte varint becomes an 8-byte
    int64) and its values' Python forms (at most ``most`` of them: :func:`inputs_of`)."""
    decoded = DECODED_BYTES_PER_MESSAGE_BYTE * message_bytes
    return decoded + parsed_bytes(message_bytes, most, PARSED["features"])


def add_servicer(servicer: InferenceServicer, server: aio.Server) -> None:
    """The generated registration, except that ModelInfer takes and gives bytes: its message
    is priced against the memory budget before it is decoded, and its answer serialized, both
    off the event loop when large (grpcio would serialize it on the loop)."""
    methods = {"ServerLive": pb.ServerLiveRequest, "ServerReady": pb.ServerReadyRequest,
               "ModelReady": pb.ModelReadyRequest, "ServerMetadata": pb.ServerMetadataRequest,
               "ModelMetadata": pb.ModelMetadataRequest, "ModelInfer": None,
               "RepositoryIndex": pb.RepositoryIndexRequest,
               "RepositoryModelLoad": pb.RepositoryModelLoadRequest,
               "RepositoryModelUnload": pb.RepositoryModelUnloadRequest}
    handlers = {name: grpc.unary_unary_rpc_method_handler(
        getattr(servicer, name), request_deserializer=request.FromString if request else None,
        response_serializer=getattr(pb, name + "Response").SerializeToString if request else None)
        for name, request in methods.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def infer_request(message: bytes) -> pb.ModelInferRequest:
    try:
        return pb.ModelInferRequest.FromString(message)
    except DecodeError:
        raise invalid("the message is not a ModelInferRequest") from None


def decoded_message(request: pb.ModelInferRequest, most: int, model_input: ModelInput,
                    settings: Settings) -> Decoded:
    names = [output.name for output in request.outputs] or list(OUTPUT_NAMES)
    return decoded(inputs_of(request, most), names, [True] * len(names), model_input, settings)


def inputs_of(request: pb.ModelInferRequest, most: int) -> list[Tensor]:
    """The input tensors, from ``raw_input_contents`` (one per input, in order) or ``contents``
    (refused unread past ``most`` values: each would become a Python number)."""
    raw = request.raw_input_contents
    if not raw:
        values = sum(len(getattr(item.contents, field)) for item in request.inputs
                     for field in set(CONTENTS.values()))
        if values > most:
            raise ApiError(413, "too_many_values", f"the message holds over {most} values, more than "
                           "the largest request this deployment takes (MAX_BATCH x MAX_LEN)")
        return [typed_tensor(item) for item in request.inputs]
    if len(raw) != len(request.inputs):
        raise invalid(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    if any(item.HasField("contents") for item in request.inputs):
        raise invalid("inputs carry both contents and raw_input_contents; send one of them")
    return [tensor_from_bytes(item.name, item.datatype, list(item.shape), data)
            for item, data in zip(request.inputs, raw)]


def typed_tensor(item: pb.ModelInferRequest.InferInputTensor) -> Tensor:
    field = CONTENTS.get(item.datatype)
    if field is None:
        raise invalid(f"input '{item.name}': datatype {item.datatype!r} has no typed contents; "
                      "send it as raw_input_contents")
    return tensor_from_values(item.name, item.datatype, list(item.shape), list(getattr(item.contents, field)))


def _request_id(context: aio.ServicerContext) -> str:
    return request_id_from(value for key, value in context.invocation_metadata() or ()
                           if key == "x-request-id" and isinstance(value, str))


def _metadata(context: aio.ServicerContext, wanted: str) -> str | None:
    """The caller's first text metadata value named ``wanted``."""
    return next((value for key, value in context.invocation_metadata() or ()
                 if key == wanted and isinstance(value, str)), None)


def parameter_values(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> dict[str, Any]:
    """Each parameter's value, whichever of its fields it is (None: none is set)."""
    return {key: getattr(value, field) if (field := value.WhichOneof("parameter_choice")) else None
            for key, value in parameters.items()}


def most_calls(settings: Settings) -> int:
    """``MAX_REQUESTS``, else an eighth of the memory over what a call holds before its
    message can be priced (its bytes in grpcio's buffers, as Python bytes, and allocator slack:
    ``UNPRICED_MESSAGE_COPIES`` times the largest message), at least 4."""
    if settings.max_requests is not None:
        return settings.max_requests
    memory = settings.memory_budget_bytes or cgroup_memory_limit() or DEFAULT_BUDGET
    return max(4, memory // 8 // (UNPRICED_MESSAGE_COPIES * settings.max_body_bytes))


class GrpcServer:
    """grpcio's server and our servicer, stopped by draining (:meth:`stop`)."""

    def __init__(self, server: aio.Server, servicer: InferenceServicer) -> None:
        self.server, self.servicer = server, servicer
        self._stopping: asyncio.Task[None] | None = None

    async def stop(self, grace_s: float) -> None:
        """New calls refused (UNAVAILABLE), the calls in flight finished (within ``grace_s``)
        and the last one's answer given ``ANSWER_LINGER_S`` from its end to leave, then
        grpcio's own stop (at once when no call ended that recently). That one
        closes a connection as soon as its last call is over, which can cut that call's answer
        still on its way to the client. Calling it again waits for the same stop."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._drain_and_stop(grace_s))
        await asyncio.shield(self._stopping)

    async def _drain_and_stop(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s

        def left() -> float:
            return max(deadline - time.monotonic(), 0)

        calls = self.servicer.calls
        calls.stopping = True
        await calls.finished(left())
        lingering = calls.last_left + ANSWER_LINGER_S - time.monotonic()
        await asyncio.sleep(min(max(lingering, 0), left()))
        await self.server.stop(left())


async def start_grpc_server(repository: Repository, settings: Settings, gate: AdminGate) -> GrpcServer:
    """Listening on ``HOST:GRPC_PORT``; fails start-up when the port cannot be bound."""
    server = aio.server(options=[("grpc.max_receive_message_length", settings.max_body_bytes),
                                 ("grpc.max_send_message_length", -1)],
                        maximum_concurrent_rpcs=most_calls(settings))
    servicer = InferenceServicer(repository, settings, gate)
    add_servicer(servicer, server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    server.add_insecure_port(f"{host}:{settings.grpc_port}")
    await server.start()
    return GrpcServer(server, servicer)
