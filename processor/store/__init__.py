"""Redis plumbing: clients and outages (``connection``), every key name (``keys``), partitions
and cluster routing, the Lua scripts (``lua/``, loaded by ``scripts``) and the start-up checks
(``access``, ``keytypes``).
"""
