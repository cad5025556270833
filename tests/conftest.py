import os

from hypothesis import settings

# CI runs a fixed, reproducible set of examples; local runs explore new ones each time.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
