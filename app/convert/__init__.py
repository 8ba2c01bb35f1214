"""The conversion step: a ModelSpec becomes the Keras 3 GRU / LSTM model, saved and checked by Keras.

``pipeline`` is ``python -m app convert`` (build the model of
:mod:`app.lowering.keras_model`, save, load back, check against the parity data, write the
directory of ``directory``); ``keras_check`` runs the saved model; ``child`` runs the
pipeline in a child process at start-up; ``cache`` keeps its results by the source's
content hash.
"""
