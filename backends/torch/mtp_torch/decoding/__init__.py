"""Decoding: the torch backend that executes the core's plans, the ``MTPModel`` wrapper, the mask token."""
