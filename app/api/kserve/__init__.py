"""The Open Inference Protocol (KServe v2) over HTTP and gRPC: thin modules over the same
:class:`~app.service.model_service.ModelService` as ``/infer``.

- :mod:`.signature`: the served model as named tensors (metadata, inputs -> sequences,
  results -> output tensors); the one place that knows the model's inputs and outputs.
- :mod:`.tensors`: tensors on the wire (datatypes, JSON data, the binary tensor extension).
- :mod:`.answers`: what a v2 answer holds (its price) and how it is streamed over HTTP.
- :mod:`.rest`: the HTTP routes under ``/v2``.
- :mod:`.grpc_service`: ``inference.GRPCInferenceService`` on its own port.
- :mod:`.repository`: the model repository extension (index, load, unload) over both, for
  administrators (:mod:`.admin`), when ``REPOSITORY_API=true``.
"""

PREFIX = "/v2"  # the HTTP routes' prefix
SERVER_NAME = "bigru-serve"
EXTENSIONS = ["binary_tensor_data"]  # the protocol extensions always served (server metadata)
MODEL_REPOSITORY = "model_repository"  # Triton's name for the repository extension


def served_extensions(repository_api: bool) -> list[str]:
    """The server metadata's extensions: the repository's only while it is served."""
    return [*EXTENSIONS, MODEL_REPOSITORY] if repository_api else EXTENSIONS
