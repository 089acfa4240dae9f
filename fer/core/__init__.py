"""The foundations every other part uses, with no machine-learning imports: user errors
(`UserError`), the names of result files and records (`names`), the trial config registry
(`config`), atomic file writes and create-or-wait (`files`), and progress lines for long one-off
steps (`progress`)."""

from fer.core.errors import UserError

__all__ = ["UserError"]
