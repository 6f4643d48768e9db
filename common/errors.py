"""User-facing errors.

Anything a user can fix (missing data or weights, a bad config key, wrong shapes, a
corrupt checkpoint) raises a subclass of `UserError`. `launch/main.py` prints its
message on one line and exits non-zero, without a traceback.
"""


class UserError(Exception):
  """An error whose message tells the user what to do; shown without a traceback."""


class DataNotFoundError(UserError):
  """A dataset was not found where the config says it is."""


class ConfigError(UserError):
  """A config key is unknown, missing, or has an invalid value."""


class ShapeError(UserError):
  """An input (data batch, checkpoint leaf) has the wrong shape or dtype."""


class CheckpointError(UserError):
  """A checkpoint cannot be read (corrupt, incompatible with the config)."""


class NonFiniteLossError(UserError):
  """The training loss became NaN or inf."""


class NotWritableError(UserError):
  """An output directory (the workdir, its checkpoints/, samples/, eval/) cannot be written."""
