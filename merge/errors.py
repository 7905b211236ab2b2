"""One exception hierarchy for the whole system.

Every message names the file, the tensor and what was expected, so that the CLI can print it
as one line (exit code 2) and the service can map it to a gRPC status code.
"""

from __future__ import annotations


class WeightsmithError(Exception):
    """Base class of every error weightsmith raises on purpose."""

    #: gRPC status code name the service maps this error to.
    grpc_code: str = "INVALID_ARGUMENT"


class CheckpointError(WeightsmithError):
    """A checkpoint file or folder is malformed, unsafe or unreadable."""


class ModelNotFoundError(CheckpointError):
    """A model reference points at nothing (no such path, no such Hub repo or revision)."""

    grpc_code = "NOT_FOUND"


class MissingTensorError(CheckpointError):
    """A tensor the merge needs is absent from one of the inputs."""


class PickleRefusedError(CheckpointError):
    """A pickle checkpoint (.bin/.pt/.ckpt) was given without an explicit opt-in."""

    grpc_code = "FAILED_PRECONDITION"


class InvalidArgumentError(WeightsmithError):
    """An argument of a call is invalid: a metanet's or a zoo's configuration, a lineage option, a
    probe file... (the merge recipe's own errors are :class:`RecipeError`)."""


class RecipeError(InvalidArgumentError):
    """The merge recipe is invalid (unknown method, bad parameter, bad model list...)."""


class CodeRefusedError(RecipeError):
    """A recipe names Python code to run (an entry point) and running code was not allowed."""

    grpc_code = "FAILED_PRECONDITION"


class ShapeMismatchError(WeightsmithError):
    """Input tensors that must be merged together have different shapes."""


class NonFiniteError(WeightsmithError):
    """An input tensor holds NaN or Inf values."""


class OutputExistsError(WeightsmithError):
    """The output path exists and overwriting was not asked for."""

    grpc_code = "ALREADY_EXISTS"


class OutputOverlapError(WeightsmithError):
    """The output path is, contains or lies inside one of the command's inputs."""


class MergeCancelled(WeightsmithError):
    """A running merge was cancelled; nothing was written."""

    grpc_code = "CANCELLED"


class HubAccessError(ModelNotFoundError):
    """A Hub repo exists but the token does not grant access (gated, private, invalid or read-only token)."""

    grpc_code = "PERMISSION_DENIED"


class HubUnavailableError(ModelNotFoundError):
    """The Hub cannot be reached (or offline mode is on) and the model is not in the local cache."""

    grpc_code = "UNAVAILABLE"


class AdapterError(CheckpointError):
    """A LoRA adapter is malformed, or does not fit the base model it is applied to."""


class UnsupportedAdapterError(AdapterError):
    """An adapter type or option weightsmith cannot apply exactly (DoRA, LoHa, LoKr, lora_bias...)."""


# -- soups (merge/soups/folder.py, merge/methods/soups.py) ------------------------------------------------
class SoupError(WeightsmithError):
    """A soup folder operation is invalid (not a soup, unknown or duplicate member, empty soup...)."""

    grpc_code = "FAILED_PRECONDITION"


class IntegrityError(CheckpointError):
    """A file no longer has the content hash recorded for it (a soup member changed on disk)."""

    grpc_code = "DATA_LOSS"


class MaskMismatchError(ShapeMismatchError):
    """Sparse checkpoints that must share one sparsity mask (zero pattern) do not."""

class TokenizerError(WeightsmithError):
    """Tokenizers cannot be loaded, merged into one vocabulary, or matched to the embeddings."""
