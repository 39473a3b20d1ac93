"""A consumer's parts: the process that reads, owns, batches, runs the handler and writes.

``consumer`` is the loop; ``subscriber`` reads the channel, ``heartbeat`` and ``membership``
keep it in the group, ``ownership`` decides which messages it tries, ``inbox`` hands them to
the loop, ``messages`` validates them, ``writer`` and ``dedup`` write each one exactly once.
``assembly`` builds the parts, ``reporting`` tells the group and the supervisor of the loop,
``fence`` rejoins after the group declared it dead, ``takeover`` skips what others wrote.
"""
