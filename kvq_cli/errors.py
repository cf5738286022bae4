"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""


class KvqError(Exception):
    """A mistake in the user's input (bad model, artifact, data, option). Never a bug."""
