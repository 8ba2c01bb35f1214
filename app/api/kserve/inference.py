"""The opening of a v2 inference, written once for HTTP and gRPC: the model named and ready,
the inputs decoded into checked sequences (off the event loop: :func:`decoded` runs on the
parsing thread), the outputs chosen, the answer planned and the request admitted."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.api.dataplane import Admitted, admit_and_start, check_ready
from app.api.kserve.answers import AnswerPlan
from app.api.kserve.signature import check_model, check_output_names, output_widths, sequences_from
from app.api.kserve.tensors import Tensor
from app.config import Settings
from app.service.model_service import ModelService
from app.spec import ModelInput


def check_open(service: ModelService, name: str, version: str) -> None:
    """The model is the one served (404) and ready (503)."""
    check_model(service, name, version)
    check_ready(service)


@dataclass
class Decoded:
    """What a v2 request asks: its sequences, their padded width, the outputs and their form."""

    sequences: list[np.ndarray]
    steps: int
    names: list[str]
    binary: list[bool]


def decoded(inputs: list[Tensor], names: list[str], binary: list[bool], model_input: ModelInput,
            settings: Settings) -> Decoded:
    sequences, steps = sequences_from(inputs, model_input, settings.max_batch, settings.max_len)
    check_output_names(names)
    return Decoded(sequences, steps, names, binary)


async def admitted(service: ModelService, request: Decoded, over_grpc: bool, body_bytes: int,
                   timeout_s: float) -> tuple[AnswerPlan, Admitted]:
    """The answer's plan, and the request admitted and started (it takes the sequences: the
    caller drops ``request``)."""
    batch, widths = len(request.sequences), output_widths(service)
    plan = (AnswerPlan(request.names, request.binary, batch, request.steps, widths) if over_grpc else
            AnswerPlan.over_http(request.names, request.binary, batch, request.steps, widths))
    sequences, request.sequences = request.sequences, []
    started = await admit_and_start(service, sequences, plan.pricing(over_grpc), body_bytes, timeout_s,
                                    service.metrics)
    return plan, started
