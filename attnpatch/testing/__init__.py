"""Helpers for tests: tiny diffusers and transformers models built from config (no download), and device
emulation, for attnpatch's own tests, its demo and users' tests of their own backends.

``attnpatch.testing.tiny`` builds the models; :func:`emulate_device` makes the dispatcher treat CPU tensors as
tensors of a GPU, so a backend's rules and adapter can run on a machine without one.
"""

from __future__ import annotations

from attnpatch.testing.device import emulate_device

__all__ = ["emulate_device"]
