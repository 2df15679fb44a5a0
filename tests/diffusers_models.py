"""Moved to :mod:`attnpatch.testing.diffusers_models`; this alias lasts only until every test imports it from there."""

import sys

from attnpatch.testing import diffusers_models

sys.modules[__name__] = diffusers_models
