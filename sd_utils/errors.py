"""The exceptions sdxl-olive raises on purpose; ``main`` turns each into one line and an exit code."""

from __future__ import annotations


class SdxlOliveError(Exception):
    """Base class: an error we expect and can explain in one line."""

    exit_code = 1


class UserInputError(SdxlOliveError):
    """An option or input file is wrong; the message names the value and the fix."""

    exit_code = 2


class ModelNotFoundError(UserInputError):
    """The model id or folder does not resolve to a usable SDXL checkpoint."""


class ProviderUnavailableError(SdxlOliveError):
    """The requested ONNX Runtime execution provider is not installed or cannot run here."""

    exit_code = 3


class SetupError(SdxlOliveError):
    """A required package or file of the installation is missing."""

    exit_code = 3


class OptimizationError(SdxlOliveError):
    """An Olive workflow did not produce the models it should have."""

    exit_code = 4


class OutOfMemoryError(SdxlOliveError):
    """ONNX Runtime could not allocate the memory a session or a run needs; the message says how to need less."""

    exit_code = 6


class SafetyCheckError(SdxlOliveError):
    """The safety checker kept flagging some images past the retry cap."""

    exit_code = 5


class DiskFullError(SdxlOliveError):
    """The disk filled up while the tool wrote models or images; the message says what was kept and where."""

    exit_code = 7
