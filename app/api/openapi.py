"""The OpenAPI schema as the loaded model and this deployment make it: ``/infer``'s body for
the model's input (token ids up to its vocabulary, or feature vectors of its width) and the
limits in words."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.api.schemas import make_infer_request
from app.config import Settings
from app.service.repository import NotReady, Repository, UnknownModel
from app.spec import ModelInput, TokenInput


def limits_description(limits: dict[str, Any]) -> str:
    """This deployment's limits, in words, for the OpenAPI description of ``/infer``."""
    text = (
        f"Limits of this deployment: 1..{limits['max_batch']} sequences of 1..{limits['max_len']} "
        f"tokens; bodies up to {limits['max_body_bytes']} bytes (else 413 `body_too_large`); headers "
        f"within {limits['header_timeout_s']:g} s and the body within {limits['body_timeout_s']:g} s "
        "(else 408). Each request is priced in memory before its body is read (the body and what "
        "parsing it holds; a body with more values than the largest request gets 413 "
        "`too_many_values` unparsed) and again before it runs (its tokens, and the output rows in "
        "flight, hidden states included with `return_hidden`)")
    if "memory_budget_bytes" in limits:
        text += (
            f": one that needs more than {limits['largest_request_cost_bytes']} bytes gets 413 "
            "`over_memory_budget` (split it into smaller requests, or drop `return_hidden`); while "
            f"the budget of {limits['memory_budget_bytes']} bytes ({limits['memory_budget_from']}) is "
            f"taken, requests wait up to {limits['request_timeout_s']:g} s, else 503 `overloaded` "
            "with Retry-After")
    return text + (". Large answers are streamed (chunked) as they are computed; with "
                   "`return_hidden`, `hidden` comes before `outputs` in the document.")


def publish_model_schema(app: FastAPI, settings: Settings) -> None:
    """``/openapi.json`` describes the loaded model's ``/infer`` body and this deployment's limits."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        """The schema of the loaded model's input: token ids up to its vocabulary, or
        feature vectors of its width."""
        schema = generate()
        repository: Repository | None = getattr(app.state, "repository", None)
        name = repository.default_name() if repository is not None else None
        try:
            service = repository.described(name) if repository is not None and name else None
        except (UnknownModel, NotReady):
            service = None
        if service is not None and service.bundle is not None:
            body = schema["paths"]["/infer"]["post"]["requestBody"]["content"]["application/json"]
            body["schema"] = request_schema(settings, service.model_input)
            schema["paths"]["/infer"]["post"]["description"] = limits_description(service.limits())
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def request_schema(settings: Settings, model_input: ModelInput) -> dict[str, Any]:
    """The ``/infer`` body's JSON Schema for ``model_input``, its bounds filled in."""
    schema = make_infer_request(settings.max_batch, settings.max_len, model_input.kind).model_json_schema()
    step = schema["properties"]["sequences"]["items"]["items"]
    if isinstance(model_input, TokenInput):
        step["minimum"], step["maximum"] = model_input.id_range[0], model_input.id_range[1] - 1
    else:
        step["minItems"] = step["maxItems"] = model_input.features
    schema["description"] = input_in_words(model_input)
    return schema


def input_in_words(model_input: ModelInput) -> str:
    if isinstance(model_input, TokenInput):
        low, high = model_input.id_range
        return f"sequences of token ids: integers in [{low}, {high})"
    text = f"sequences of steps, each a vector of {model_input.features} numbers"
    if model_input.mask_value is not None:  # the model's Masking: such a step is padding to it
        text += f", not all equal to {model_input.mask_value:g}"
    return text
