"""Moved to :mod:`attnpatch.testing.transformers_models`; this alias lasts only until every test imports it from there."""

import sys

from attnpatch.testing import transformers_models

sys.modules[__name__] = transformers_models
