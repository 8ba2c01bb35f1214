"""Drive the model repository extension with the real ``tritonclient`` (HTTP or gRPC), as an
administrator's script would. Runs in ``.venv-client`` (see tests/triton_client.py);
tests/test_repository_api.py runs it against a real server and checks what it wrote:

    .venv-client/bin/python tests/triton_repository_client.py http|grpc URL TOKEN MODEL OUT.json

``OUT.json``: the index before, while and after ``MODEL`` is loaded, its readiness, and how
calls without the token, with a wrong one and for an unknown model were refused.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def refusal(call: Callable[[], Any]) -> dict:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": exc.message()}
    return {"status": "answered"}


def main(protocol: str, url: str, token: str, model: str, out: str) -> None:
    http = protocol == "http"
    client: Any = (httpclient if http else grpcclient).InferenceServerClient(url)
    key = "Authorization" if http else "authorization"  # gRPC metadata keys are lower case
    admin = {key: f"Bearer {token}"}

    def index() -> list[dict]:
        if http:
            return client.get_model_repository_index(headers=admin)
        return client.get_model_repository_index(headers=admin, as_json=True).get("models", [])

    def ready() -> Any:
        try:
            return client.is_model_ready(model)
        except InferenceServerException as exc:  # gRPC: an unknown model is NOT_FOUND
            return str(exc.status())

    report: dict[str, Any] = {
        "extensions": (client.get_server_metadata() if http else
                       client.get_server_metadata(as_json=True))["extensions"],
        "no_token": refusal(client.get_model_repository_index),
        "wrong_token": refusal(lambda: client.load_model(model, headers={key: "Bearer wrong"})),
        "index_before": index()}
    client.load_model(model, headers=admin)
    report |= {"ready_loaded": ready(), "index_loaded": index()}
    client.unload_model(model, headers=admin)
    report |= {"ready_unloaded": ready(), "index_unloaded": index(),
               "unknown": refusal(lambda: client.load_model("nosuch", headers=admin))}
    Path(out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
