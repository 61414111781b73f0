"""Errors the engine raises on purpose, each with a message that says what to do."""


class SynomalyError(Exception):
    """Base class: anything the user can fix (bad input, bad model, bad settings)."""


class InputError(SynomalyError, ValueError):
    """The input image or mask cannot be processed as given."""


class ModelFileError(SynomalyError):
    """A model file is missing, corrupt, or not a Synomaly model."""


class DeviceError(SynomalyError):
    """The requested compute device is not available."""


class OutputError(SynomalyError):
    """Outputs cannot be written (exist already, or the folder is not writable)."""


class Cancelled(SynomalyError):
    """The caller asked to stop: detection wrote nothing; training saved a checkpoint to resume from."""
