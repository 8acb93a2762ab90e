"""Registered components: each module here defines ``COMPONENT`` (see ``parity.component``)."""
