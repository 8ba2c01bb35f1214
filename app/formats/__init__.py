"""File formats in, one :class:`~app.spec.ModelSpec` out: :mod:`app.formats.bundle` takes
``MODEL_PATH`` and dispatches its model file to the reader of its kind."""
