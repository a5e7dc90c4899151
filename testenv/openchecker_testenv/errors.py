"""Exceptions raised while setting up the local environment."""


class SetupError(Exception):
    """A server or tool of the local environment could not be set up.

    The message names what failed and what to do next, so callers can show it
    to the user as it is.
    """


class PortInUseError(SetupError):
    """A server failed to start because another process took its port first.

    Raised so that the caller can retry the start on other free ports.
    """
