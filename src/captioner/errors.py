"""The project's errors: problems a user can fix, each message naming the file or setting and what is wrong.

`captioner.cli.main` prints a `CaptionerError` as one line, `captioner: error: MESSAGE`; any other exception
is a bug in captioner and keeps its traceback (as does everything with `--traceback` or CAPTIONER_DEBUG=1).
Each class also derives from the built-in error it refines (ValueError for bad input, RuntimeError for a
state of the machine or the disk, KeyError for an unknown name), so callers that catch those still work.

Only the standard library is imported here: every module, even the torch-free ones, can raise these.
"""

from __future__ import annotations


class CaptionerError(Exception):
    """Base class: bad input, a bad file, a missing dependency; never a bug in captioner itself."""


class ConfigError(CaptionerError, ValueError):
    """A setting that cannot work: a training config key, a decoding option, a command-line value."""


class DataError(CaptionerError, ValueError):
    """A data set whose files cannot be read as captions and images (`captioner.data`)."""


class ImageError(CaptionerError, ValueError):
    """An image that cannot be used; str() is 'PATH: what is wrong', e.g. 'a.jpg: file is empty (0 bytes)'."""

    path: str
    reason: str

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)  # args match __init__, so the error pickles out of DataLoader workers
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class UnknownNameError(CaptionerError, KeyError):
    """An encoder, decoder or other registry entry that does not exist; the message lists those that do."""

    def __str__(self) -> str:  # KeyError's own str() quotes the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(CaptionerError, RuntimeError):
    """A checkpoint or ONNX export directory that is missing, incomplete or written by another version."""


class FeatureCacheError(CaptionerError, RuntimeError):
    """A feature cache that is missing, or that was made by another encoder or preprocessing."""


class EncoderWeightsError(CaptionerError, RuntimeError):
    """Pretrained weights for an encoder could not be found or downloaded."""


class ExportError(CaptionerError, RuntimeError):
    """An ONNX export that cannot be written or that does not compute what the torch model does."""


class SearchIndexError(CaptionerError, ValueError):
    """A photo index (SQLite) that is not one, is of another schema, or was made by another model."""


class TrainingRunError(CaptionerError, FileExistsError):
    """A training output directory that holds a run the command would overwrite or cannot resume."""


class MissingDependencyError(CaptionerError, ImportError):
    """An optional dependency a command needs is not installed; the message says what to install."""
