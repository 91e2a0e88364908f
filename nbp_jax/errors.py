"""The failures a user is expected to meet and fix (a wrong flag, a missing file, a stage not run yet).

`python -m nbp_jax.main` prints a `UserError` as one line and exits with status 2; any other exception is a bug and
keeps its traceback. `--verbose` (or NBP_VERBOSE=1) shows the traceback of a UserError too. The project's own error
classes derive from UserError and from the built-in class they always were (ValueError, FileNotFoundError, ...), so
`except ValueError` around them keeps working.
"""

from __future__ import annotations


class UserError(Exception):
  """An expected failure; the message says what is wrong and what to run or change."""


class MissingError(UserError, FileNotFoundError):
  """A file, folder or stage output that a mode needs does not exist; the message names the command that makes it."""


class Preempted(Exception):
  """Training saved a checkpoint and stopped early (SIGTERM, Ctrl-C); the same command resumes it.

  Raised rather than returned, so that nothing after the training stage (tokenizing with a half-trained tokenizer,
  evaluating a half-trained model, training the next one) runs. `python -m nbp_jax.main` exits with `exit_status`:
  128 + the signal's number, as a process the signal stopped, so that a scheduler does not take the job as done.
  """

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason  # 'SIGTERM' or 'Ctrl-C'

  @property
  def exit_status(self) -> int:
    return 130 if self.reason == 'Ctrl-C' else 143
