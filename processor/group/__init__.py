"""The group and its control: the supervisor that keeps a host's consumers alive, the
live signals it answers, and the control plane in Redis that sizes and stops the whole group
across hosts (``controlplane``, followed by ``steering``, sized by ``shares`` and ``autoscale``).
"""
