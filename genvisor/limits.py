"""Sizes and defaults that more than one room must agree on (the contract's defaults
among them: one definition, read by the client, the wire and the modes)."""

# One frame of a run's channel (daemon ⇄ worker): a run spec carries the whole context
# window, an outcome the whole turn; the same bound as a client frame (ipc.frames).
MAX_CHANNEL_FRAME = 64 * 1024 * 1024

# CONTRACT defaults of the await calls and of a run's context.
AWAIT_TIMEOUT_MS = 30_000
AWAIT_CANCEL_REASON = "await_timeout"
CONTEXT_MESSAGES = 40  # max_messages: how many messages of history a context keeps
