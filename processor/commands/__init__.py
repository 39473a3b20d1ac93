"""The one-shot commands beside the daemon: ``processor status``, ``scale``/``stop``/``start``
(``group``) and ``publish``.
"""
