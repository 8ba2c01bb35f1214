"""The conversion step: a ModelSpec becomes the Keras 3 BiGRU model."""
