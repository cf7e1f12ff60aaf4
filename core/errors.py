"""The one exception family of train-export-serve.

Every error a user can meet derives from `TesError` and says what went wrong, where, what was expected
against what came, and what to do about it.
"""

from __future__ import annotations


class TesError(Exception):
    """Base class of every error raised on purpose by this project."""


class ConfigError(TesError):
    """One or more configuration problems, all reported at once.

    Each problem is one line: `field: what is wrong (expected ..., got ...); fix`.
    """

    def __init__(self, problems: list[str], *, where: str = "configuration"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {where}:\n{lines}")


class RecipeError(TesError):
    """A recipe could not be found, imported or built."""


class TrainingError(TesError):
    """Training could not start or resume."""


class ExportError(TesError):
    """ONNX export or its check failed."""


class VerificationError(ExportError):
    """ONNX Runtime outputs disagree with torch beyond tolerance; lists every mismatch."""

    def __init__(self, mismatches: list[str]):
        self.mismatches = list(mismatches)
        lines = "\n".join(f"  - {mismatch}" for mismatch in self.mismatches)
        super().__init__(
            f"ONNX outputs differ from torch in {len(self.mismatches)} place(s):\n{lines}\n"
            "Check for ops that behave differently in eval mode, or loosen the tolerance if the "
            "difference is expected for this precision."
        )


class VariantSkipped(ExportError):
    """A precision variant cannot be built or run on this machine; the message is the reason."""


class RepositoryError(TesError):
    """The Triton model repository could not be written or is not what it should be."""


class ChecksumError(RepositoryError):
    """An artifact's sha256 does not match the one recorded when it was written."""


class EngineMismatch(RepositoryError):
    """A TensorRT engine built for another GPU architecture or TensorRT version than the Triton that will run it,
    or one that cannot be rebuilt for it here."""


class StageTimeout(TesError):
    """A pipeline stage ran past its time limit and was stopped."""


class ServerError(TesError):
    """A server (Triton, Prefect) could not be started, reached or stopped."""


class InferenceError(TesError):
    """A request to the served model failed or was refused."""
