"""The opening of a v2 inference, written once for HTTP and gRPC: the inputs decoded into
checked sequences (off the event loop: :func:`decoded` runs on the parsing thread), the
outputs chosen, the answer planned and the request admitted."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.api.dataplane import Admitted, admit_and_start
from app.api.kserve.answers import AnswerPlan
from app.api.kserve.signature import check_output_names, output_widths, sequences_from
from app.api.kserve.tensors import Tensor
from app.config import Settings
from app.service.model_service import Lease
from app.spec import ModelInput


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


async def admitted(lease: Lease, request: Decoded, over_grpc: bool, body_bytes: int,
                   timeout_s: float) -> tuple[AnswerPlan, Admitted]:
    """The answer's plan, and the request admitted and started on the version ``lease`` holds
    (it takes the sequences: the caller drops ``request``)."""
    service = lease.service
    batch, widths = len(request.sequences), output_widths(service)
    plan = (AnswerPlan(request.names, request.binary, batch, request.steps, widths) if over_grpc else
            AnswerPlan.over_http(request.names, request.binary, batch, request.steps, widths))
    sequences, request.sequences = request.sequences, []
    started = await admit_and_start(lease, sequences, plan.pricing(over_grpc), body_bytes, timeout_s,
                                    service.metrics)
    return plan, started
