"""A consumer's parts: the process that reads, owns, batches, runs the handler and writes.

``consumer`` is the loop; ``subscriber`` reads the channel, ``heartbeat`` and ``membership``
keep it in the group, ``ownership`` decides which messages it tries, ``inbox`` hands them to
the loop, ``messages`` validates them, ``writer`` and ``dedup`` write each one exactly once.
"""
