"""The Open Inference Protocol (KServe v2) over HTTP and gRPC: thin modules over the same
:class:`~app.service.model_service.ModelService` as ``/infer``.

- :mod:`.signature`: the served model as named tensors (metadata, inputs -> sequences,
  results -> output tensors); the one place that knows the model's inputs and outputs.
- :mod:`.tensors`: tensors on the wire (datatypes, JSON data, the binary tensor extension).
- :mod:`.answers`: what a v2 answer holds (its price) and how it is streamed over HTTP.
- :mod:`.rest`: the HTTP routes under ``/v2``.
- :mod:`.grpc_service`: ``inference.GRPCInferenceService`` on its own port.
"""

PREFIX = "/v2"  # the HTTP routes' prefix
SERVER_NAME = "bigru-serve"
EXTENSIONS = ["binary_tensor_data"]  # the protocol extensions served (server metadata)
