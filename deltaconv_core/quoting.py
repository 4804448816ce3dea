"""The one way text from a file or an input (tensor names, metadata, user strings) enters a message or a log.

Such text may be megabytes long, hold terminal escape sequences or control characters, or be nested too deeply to
print: quoted() shows it as its repr, every character that is not printable escaped, cut to a bounded length.
"""
MAX_QUOTED = 120


def _escaped(text: str) -> str:
    # repr escapes control characters in strings, but not in the repr of every other object
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def quoted(value, limit: int = MAX_QUOTED) -> str:
    """`value` as messages quote it: repr, non-printable characters escaped, at most about `limit` characters."""
    try:
        text = repr(value)
    except RecursionError:  # e.g. lists nested thousands deep from damaged JSON
        return f"<{type(value).__name__} nested too deeply to show>"
    if len(text) > limit:
        text = text[: limit - 20] + f"… ({len(text)} characters)"
    return _escaped(text)
