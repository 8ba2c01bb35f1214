"""Models' lives and request scheduling: loading and readiness (``model_service``), the
micro-batcher, and the memory price of a request (``pricing``)."""
