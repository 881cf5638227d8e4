"""Typed errors. Each carries its HTTP status; backend/web/app.py maps them to answers and
backend/commands/cli.py to exit codes, each in one place."""


MAX_MESSAGE_CHARS = 4000


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Text fit for one log line: control characters and lone surrogates escaped (a newline in a
    request value cannot forge a log line, nor a surrogate break the log handler), and a huge value
    cut in the middle (both ends usually say the most)."""
    def cut(value: str) -> str:
        if len(value) <= limit:
            return value
        head = limit * 3 // 5
        return f"{value[:head]} ... [{len(value) - limit} characters] ... {value[len(value) - (limit - head):]}"

    text = cut(text)
    if not text.isprintable():
        text = cut("".join(c if c.isprintable() else repr(c)[1:-1] for c in text))
    return text


class BackendError(Exception):
    """Base class: a problem with a message that is safe to show to the caller and to log (messages
    quote request values, so they are made one line, of bounded length)."""

    status = 500

    def __init__(self, message: str):
        message = one_line(message)
        super().__init__(message)
        self.message = message


class InvalidRequest(BackendError):
    """The request body is malformed: missing fields, bad coordinates, unknown region types."""

    status = 400


class Unauthorized(BackendError):
    status = 401


class HostNotAllowed(BackendError):
    """An image URL points at a host the backend is not allowed to download from."""

    status = 403


class ImageTooLarge(BackendError):
    status = 413


class UnservableConfig(BackendError):
    """The project's label config lacks something the backend needs (image, output tag, label)."""

    status = 422


class UnsupportedInput(BackendError):
    """Well-formed input the backend cannot handle, e.g. a rotated image or an undecodable file."""

    status = 422


class InvalidRegion(UnsupportedInput):
    """A region from Label Studio that cannot be read as a mask: a bitmask that is not a PNG data
    URL, of another size than its image, or larger than such a PNG can be. Label Studio stores what
    it is sent, so its regions are checked like any other input."""


class ImageUnavailable(BackendError):
    """The image could not be downloaded (upstream error, timeout, refused credentials)."""

    status = 502


class NotConfigured(BackendError):
    """The backend lacks a setting it needs for this (LABEL_STUDIO_URL, REDIS_URL, ...): the
    server's problem, not the caller's; the message names what to set."""

    status = 503


class LabelStudioUnavailable(BackendError):
    """Label Studio's API refused or failed a call: wrong project id, revoked token, server down."""

    status = 502


class Busy(BackendError):
    """The backend cannot start this work in time (encoders saturated): try again after a while."""

    status = 503

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after


class ModelUnavailable(BackendError):
    """The SAM checkpoint is missing or broken; the message says where to put it."""

    status = 503
