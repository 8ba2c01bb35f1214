"""Errors that carry a message meant for the person running the service."""


class ModelError(Exception):
    """A model file cannot be served as it is; the message names the layer or dataset and why."""


class ConfigurationError(Exception):
    """The settings contradict each other or name something unusable: the service does not start."""
