"""The root of peerpipe's error taxonomy.

Each part of the package (engine, protocol, room, ...) derives its own base from
``PeerpipeError``; the CLI turns any of them into one line and a non-zero exit.
"""


class PeerpipeError(Exception):
    """Base of every error peerpipe raises on purpose. Its message is meant for the user."""
