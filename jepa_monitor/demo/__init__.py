"""The embedded demo: digits data, a small JEPA-style encoder, and the run that ties them."""
