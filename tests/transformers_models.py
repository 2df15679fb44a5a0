"""Moved to :mod:`attnpatch.testing.transformers_models`; alias until all tests import it there."""

import sys

from attnpatch.testing import transformers_models

sys.modules[__name__] = transformers_models
