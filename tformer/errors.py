"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class TformerError(Exception):
    """A problem the user can fix (bad input, a broken checkpoint); its message is one line."""


class ConfigError(TformerError, ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


class CheckpointError(TformerError):
    """A checkpoint directory is missing, incomplete or does not match its config."""


class UnsupportedModelError(CheckpointError, ValueError):
    """A Hugging Face directory whose model_type, option or value tformer cannot represent exactly."""
