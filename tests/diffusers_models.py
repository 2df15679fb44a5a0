"""Moved to :mod:`attnpatch.testing.diffusers_models`; alias until all tests import it there."""

import sys

from attnpatch.testing import diffusers_models

sys.modules[__name__] = diffusers_models
