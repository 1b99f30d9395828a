"""Sizes that more than one room must agree on."""

# One frame of a run's channel (daemon ⇄ worker): a run spec carries the whole context
# window, an outcome the whole turn; the same bound as a client frame (ipc.frames).
MAX_CHANNEL_FRAME = 64 * 1024 * 1024
