"""The one error type of the checkpoint format."""


class CheckpointFormatError(ValueError):
    """A checkpoint (or a request on one) that the format cannot serve; the message names the file,
    tensor or setting at fault. Raised before anything is written."""
